"""Loading: where a model or data set comes from, and what a diffusers checkpoint holds, decided in one place.

``check_source`` tells a local folder from a Hub repo id: a name that looks like a local path (it starts
with ``.``, ``/`` or ``~``, or its parent folder exists) but does not exist is refused at once, instead of
being tried as a Hub id. ``inspect_source`` reads only the configs (``model_index.json`` or ``config.json``)
and checks the denoiser's family before any weight is read; ``load_components`` then loads the denoiser,
scheduler and VAE with diffusers' own ``from_pretrained`` and, for text-conditioned models, the text encoders
and tokenizers with transformers' (safety checkers, feature extractors and image encoders are never loaded), in
the requested ``dtype`` (diffusers' and transformers' name; the older ``torch_dtype`` is accepted too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import UsageError, UsageTypeError
from .families import DENOISER_COMPONENTS, SUPPORTED, DenoiserFamily, family_named


def looks_local(name: str) -> bool:
    """True if ``name`` reads as a filesystem path rather than a Hub id (whether or not it exists)."""
    parent = os.path.dirname(os.path.expanduser(name).rstrip("/"))
    return name.startswith((".", "/", "~")) or (bool(parent) and os.path.isdir(parent))


def is_hub_id(name: str | None) -> bool:
    """True for a valid Hub repo id (``name`` or ``owner/name``) that is not a local path."""
    if not name or os.path.exists(os.path.expanduser(name)) or looks_local(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_source(name: str, flag: str) -> str:
    """``name`` (user-expanded if local) when it is an existing path or a valid Hub id, else a ``UsageError``.

    ``flag`` names the argument in the message, e.g. ``--model``.
    """
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    if looks_local(name):
        raise UsageError(
            f"{flag} {name!r} is not a folder (no such path): give an existing local folder or a Hub id (owner/name)."
        )
    if not is_hub_id(name):
        raise UsageError(f"{flag} {name!r} is neither an existing folder nor a valid Hub id: give one of the two.")
    return name


def read_root_json(path_or_hub_id: str, filename: str, **hub_kwargs) -> dict | None:
    """The JSON ``filename`` at the root of a folder or Hub repo, or None if it is not there."""
    if os.path.isdir(path_or_hub_id):
        path = os.path.join(path_or_hub_id, filename)
        if not os.path.isfile(path):
            return None
    elif os.path.exists(path_or_hub_id):
        raise UsageError(f"{path_or_hub_id!r} is a file: pass the folder that holds the diffusers config.")
    else:
        try:
            path = hf_hub_download(path_or_hub_id, filename, **hub_kwargs)
        except LocalEntryNotFoundError:
            raise UsageError(
                f"{path_or_hub_id!r} is not a local folder, and as a Hub repo it is neither reachable nor cached: "
                "go online (or fill the cache), or pass a local folder."
            ) from None
        except RepositoryNotFoundError:
            raise UsageError(
                f"There is no Hub repo {path_or_hub_id!r} (or it is private or gated): check the name, or log in "
                "with `hf auth login`."
            ) from None
        except EntryNotFoundError:
            return None
    try:
        with open(path) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}): it is damaged; download or save it again.") from None


@dataclass(frozen=True)
class DiffusersSource:
    """A checked diffusers checkpoint: a pipeline layout (``model_index.json``) or a bare model folder.

    ``denoiser_key`` is ``"unet"`` or ``"transformer"`` for a pipeline and None for a bare model;
    ``pipeline_class`` the diffusers pipeline of ``model_index.json`` when it encodes prompts (e.g.
    ``"StableDiffusionXLPipeline"``).
    """

    path: str
    family: DenoiserFamily
    model_index: dict | None = None
    denoiser_key: str | None = None

    @property
    def pipeline_class(self) -> str | None:
        import diffusers

        name = (self.model_index or {}).get("_class_name")
        return name if name and hasattr(getattr(diffusers, name, None), "encode_prompt") else None

    def component_names(self) -> list[str]:
        """The pipeline components present (not saved as ``[null, null]``), in model_index order."""
        index = self.model_index or {}
        return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]


def inspect_source(
    path_or_hub_id: str | os.PathLike, who: str = "ddae_diffusers", flag: str = "model", **hub_kwargs
) -> DiffusersSource:
    """Reads only the configs of a pipeline folder/repo or model folder and checks its denoiser.

    Raises a ``UsageError`` (``UsageTypeError`` for an unsupported class) naming what was found and what
    ``who`` supports, before any weight is read; ``flag`` names the argument when the path does not exist.
    """
    path = check_source(os.fspath(path_or_hub_id), flag)
    model_index = read_root_json(path, "model_index.json", **hub_kwargs)
    if model_index is not None:
        present = [k for k in DENOISER_COMPONENTS if (model_index.get(k) or [None])[0] is not None]
        if len(present) != 1:
            found = " and ".join(present) if present else None
            raise UsageError(
                f"{path}/model_index.json names {found}: {who} needs exactly one 'unet' or 'transformer'."
                if found
                else f"{path}/model_index.json has no 'unet' or 'transformer' component: {who} needs one."
            )
        key = present[0]
        library, class_name = model_index[key]
        try:
            family = family_named(class_name)
        except UsageTypeError:
            raise UsageTypeError(f"{path} has a {library}.{class_name} {key}; {who} supports {SUPPORTED}.") from None
        return DiffusersSource(path, family, model_index, key)
    config = read_root_json(path, "config.json", **hub_kwargs)
    if config is None:
        raise UsageError(
            f"{path!r} holds no diffusers config (neither model_index.json nor config.json): pass a diffusers "
            "pipeline folder or repo (model_index.json with unet/ or transformer/, scheduler/) or a model folder."
        )
    class_name = config.get("_class_name")
    try:
        family = family_named(class_name)
    except UsageTypeError:
        hint = (
            " It is a DDAEForImageClassification export: load the pipeline it came from and pass it as "
            f"DDAEPipeline.from_pretrained(pipeline_dir, classifier={path!r})."
            if config.get("model_type") == "ddae"
            else ""
        )
        found = class_name or config.get("model_type") or "non-diffusers"
        raise UsageTypeError(f"{path!r} holds a {found} model; {who} supports {SUPPORTED}.{hint}") from None
    return DiffusersSource(path, family)


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The weights' dtype asked for by ``dtype`` or by its older name ``torch_dtype`` (None: float32 as saved)."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise UsageError(
            f"Got dtype={dtype} and torch_dtype={torch_dtype}: pass only dtype (torch_dtype is its old name)."
        )
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageTypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
    return dtype


def _from_pretrained(model_class, path: str, what: str, **kwargs):
    """``model_class.from_pretrained`` with unreadable weights (truncated, corrupt, missing) named in a UsageError."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as error:
        if isinstance(error, ConnectionError):
            raise
        reason = " ".join(str(error).split())[:300].rstrip(".")
        raise UsageError(
            f"Cannot load the {what} {path!r}: {reason}. A file of it is probably truncated or corrupt: "
            "download or save it again."
        ) from None


def load_components(source: DiffusersSource, dtype: torch.dtype | None = None, **hub_kwargs) -> dict[str, object]:
    """The components of ``source``: ``{"denoiser", "scheduler", "vae", "text"}`` (None / {} when absent);
    ``"text"`` maps the text encoders and tokenizers of a text-conditioned model by component name.

    ``dtype`` (or the older ``torch_dtype``) loads the denoiser, VAE and text encoders in that dtype (None:
    float32). A bare model folder has no scheduler, VAE or text encoders.
    """
    import diffusers
    import transformers

    dtype = resolve_dtype(dtype, hub_kwargs.pop("torch_dtype", None))
    weights = {"dtype": dtype} if dtype is not None else {}

    def text_component(key: str):
        library, class_name = source.model_index[key]
        if library != "transformers" or not hasattr(transformers, class_name):
            raise UsageTypeError(
                f"Component {key!r} of {source.path} is {library}.{class_name}: not a transformers "
                "text encoder or tokenizer."
            )
        model_class = getattr(transformers, class_name)
        extra = (
            weights if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel) else {}
        )
        return _from_pretrained(model_class, source.path, f"{key} of", subfolder=key, **extra, **hub_kwargs)

    def component(key: str):
        library, class_name = source.model_index[key]
        if library != "diffusers" or not hasattr(diffusers, class_name):
            raise UsageTypeError(
                f"Component {key!r} of {source.path} is {library}.{class_name}; ddae_diffusers loads diffusers "
                f"components only ({SUPPORTED} with a diffusers scheduler and VAE)."
            )
        model_class = getattr(diffusers, class_name)
        extra = weights if isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin) else {}
        return _from_pretrained(model_class, source.path, f"{key} of", subfolder=key, **extra, **hub_kwargs)

    if source.model_index is None:
        denoiser = _from_pretrained(source.family.model_class, source.path, "model in", **weights, **hub_kwargs)
        return {"denoiser": denoiser, "scheduler": None, "vae": None, "text": {}}
    present = source.component_names()
    text_keys = source.family.text.components if source.family.conditional else ()
    return {
        "denoiser": component(source.denoiser_key),
        "scheduler": component("scheduler") if "scheduler" in present else None,
        "vae": component("vae") if "vae" in present else None,
        "text": {key: text_component(key) for key in text_keys if key in present},
    }
