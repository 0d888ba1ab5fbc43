"""Fine-tune a DDAE image classifier with the transformers ``Trainer`` (fully, frozen backbone, or LoRA).

Starts from a diffusers model (folder or Hub id; ``--layer`` and ``--timestep`` pick the feature), from a
probe-engine output folder (its best cell and trained head), or from a saved ``DDAEForImageClassification``.
Training images get random crop (padding 4) and flip on the fly; evaluation reports accuracy.

    accelerate launch training/finetune.py --model_name_or_path google/ddpm-cifar10-32 \\
        --layer up_blocks.1.resnets.2 --timestep 10 --dataset_name uoft-cs/cifar10 \\
        --output_dir ddae-cifar10 --num_train_epochs 15 --learning_rate 1e-3 --freeze_backbone

LoRA: ``--lora_r 8 --lora_alpha 16`` (adapters in ``output_dir/adapter``, the merged model in
``output_dir``). A latent model (DiT-XL-2-256 layout) carries its VAE encoder, frozen unless ``--train_vae``.
``--push_to_hub --hub_model_id me/ddae-cifar10`` uploads the final model with its card.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ddae_diffusers import DDAEForImageClassification, DDAEImageProcessor
from ddae_diffusers.data import (
    detect_image_column,
    detect_label_column,
    images_to_tensor,
    label_names,
    load_split,
    random_crop_flip,
)
from ddae_diffusers.errors import OneLineErrors, UsageError, run_command
from ddae_diffusers.hub import create_hub_repo
from ddae_diffusers.io_utils import check_writable_dir
from ddae_diffusers.loading import check_source
from ddae_diffusers.noise import noise_level
from ddae_diffusers.probing.result import ProbeResult
from ddae_diffusers.probing.stats import accuracy_entry, pack_correct

PROG = "finetune.py"

DEFAULT_LORA_TARGETS = {
    "UNet2DModel": "conv1,conv2,to_q,to_k,to_v,to_out.0",
    "DiTTransformer2DModel": "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A diffusers model (pipeline or model folder / Hub id), a probe output folder "
                  "(results.json + heads.safetensors), or a saved DDAEForImageClassification."}
    )
    layer: str | None = field(default=None, metadata={"help": "Feature block, e.g. up_blocks.1.resnets.2."})
    timestep: str | None = field(
        default=None,
        metadata={"help": "Noise level in the model's units: a DDPM timestep index (default 10, the paper's t=11) or "
                  "an EDM sigma (default: index 4 of the 18-step schedule, about 0.06)."},
    )
    head_norm: str = field(default="batchnorm", metadata={"help": "batchnorm, layernorm or none."})
    noise_policy: str = field(default="fixed", metadata={"help": "fixed, random or none."})
    classifier_dropout: float = field(default=0.0)
    freeze_backbone: bool = field(default=False, metadata={"help": "Train the head only (a linear probe)."})
    backbone_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "The backbone learns at this times --learning_rate, the head at --learning_rate "
                  "(e.g. 0.1 keeps more of the pretraining)."},
    )
    head_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "Train the head alone (backbone frozen) for this many epochs first, then everything."},
    )
    train_vae: bool = field(
        default=False, metadata={"help": "Latent models: also train the VAE encoder (frozen by default)."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the backbone; 0 disables LoRA."})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.0)
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module-name suffixes; default: resnet convs and attention "
                  "projections (UNet), attention and MLP projections (DiT)."},
    )
    license: str = field(default="apache-2.0", metadata={"help": "License in the model card."})


@dataclass
class DataArguments:
    dataset_name: str = field(metadata={"help": "A Hub dataset id or a local path load_dataset understands."})
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train")
    eval_split: str | None = field(default="test", metadata={"help": "Evaluation split; empty to skip."})
    image_column: str | None = field(default=None, metadata={"help": "Default: img or image."})
    label_column: str | None = field(default=None, metadata={"help": "Default: label or labels."})
    resolution: int | None = field(default=None, metadata={"help": "Default: the model's image size."})
    center_crop: bool = field(default=True, metadata={"help": "Center crop (else squash) when resizing."})
    random_crop_padding: int = field(default=4, metadata={"help": "Random-crop padding; 0 disables it."})
    random_flip: bool = field(default=True)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    accuracy_metric: str = field(
        default="accuracy", metadata={"help": "evaluate.load() name or local script; offline: local computation."}
    )


def load_accuracy(name: str = "accuracy"):
    """``(fn(predictions, references) -> float, source)``: ``evaluate.load(name)``, or the same computation
    locally when evaluate cannot load it (its metric scripts live on the Hub)."""
    try:
        import evaluate

        metric = evaluate.load(name)

        def evaluate_accuracy(predictions, references) -> float:
            return float(metric.compute(predictions=predictions, references=references)["accuracy"])

        return evaluate_accuracy, "evaluate"
    except Exception:  # offline, or evaluate missing: fall back to the definition
        return local_accuracy, "local"


def local_accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference (what evaluate's ``accuracy`` computes)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean())


def is_ddae_classifier(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == "ddae"


def build_model(args: ModelArguments, num_labels: int, id2label: dict[int, str] | None):
    """The classifier to train, from a probe folder, a saved classifier or a diffusers model."""
    head_norm = None if args.head_norm in ("none", "") else args.head_norm
    options = dict(head_norm=head_norm, noise_policy=args.noise_policy, classifier_dropout=args.classifier_dropout)
    path = args.model_name_or_path
    level = None if args.timestep is None else noise_level(args.timestep)
    if os.path.isdir(path) and ProbeResult.is_probe_folder(path):
        options.pop("head_norm")  # the probe's normalisation is part of its head
        model = DDAEForImageClassification.from_probe(path, layer=args.layer, timestep=level, **options)
    elif os.path.isdir(path) and is_ddae_classifier(path):
        model = AutoModelForImageClassification.from_pretrained(path)
        for name, value in (("layer", args.layer), ("timestep", args.timestep)):
            if value is not None:
                raise UsageError(f"--{name} cannot change a saved DDAE classifier ({path}); start from the backbone.")
    else:
        if args.layer is None:
            raise UsageError("--layer is required when starting from a diffusers model (e.g. up_blocks.1.resnets.2).")
        model = DDAEForImageClassification.from_diffusers(
            path,
            layer=args.layer,
            timestep=level,
            num_labels=num_labels,
            id2label=id2label,
            **options,
        )
    if model.config.num_labels != num_labels:
        raise UsageError(
            f"The model has {model.config.num_labels} classes but the data set has {num_labels}: use a data set "
            "with the same classes, or start from the diffusers backbone to get a new head."
        )
    return model


def add_lora(model, args: ModelArguments):
    """Wraps the model in a peft LoRA model: adapters on the truncated backbone, head fully trained."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules or DEFAULT_LORA_TARGETS[model.config.backbone_class]
    suffixes = [re.escape(t.strip()) for t in targets.split(",") if t.strip()]
    modules_to_save = ["classifier"] + (["feature_norm"] if model.config.head_norm else [])
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # module names ending in one of the suffixes, inside the denoiser only (never the VAE encoder)
        target_modules=rf"denoiser\..*\b({'|'.join(suffixes)})",
        modules_to_save=modules_to_save,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {targets!r} matches no backbone module: {error}") from None


def backbone_parameters(model) -> list[torch.nn.Parameter]:
    """The denoiser's parameters (also under a peft wrapper): what ``--backbone_lr_ratio`` and
    ``--head_warmup_epochs`` act on; the head and any VAE encoder are not part of it."""
    return [p for name, p in model.named_parameters() if ".denoiser." in f".{name}"]


class DDAETrainer(Trainer):
    """``Trainer`` whose backbone parameters learn at ``backbone_lr_ratio`` times the head's learning rate."""

    def __init__(self, *args, backbone_lr_ratio: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_lr_ratio = backbone_lr_ratio

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.backbone_lr_ratio == 1.0:
            return optimizer
        backbone = {id(p) for p in backbone_parameters(self.model if model is None else model)}
        groups = [
            {**group, "params": params, "lr": group["lr"] * (self.backbone_lr_ratio if in_backbone else 1.0)}
            for group in optimizer.param_groups
            for in_backbone in (False, True)
            if (params := [p for p in group["params"] if (id(p) in backbone) == in_backbone])
        ]
        optimizer.param_groups.clear()  # nothing is stepped yet: regroup head / backbone with their own lr
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer


class HeadWarmup(TrainerCallback):
    """Freezes the backbone from the start of training until ``epochs`` epochs have passed (the optimizer was
    built with it, so its parameters join the updates when they get gradients again)."""

    def __init__(self, parameters: list[torch.nn.Parameter], epochs: float):
        self.parameters, self.epochs, self.frozen = parameters, epochs, False

    def set_frozen(self, frozen: bool) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(not frozen)
        self.frozen = frozen

    def on_train_begin(self, args, state, control, **kwargs):
        self.set_frozen(True)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.frozen and state.epoch >= self.epochs:
            self.set_frozen(False)


def prepare_split(dataset, image_column: str, label_column: str, resolution: int, data_args: DataArguments,
                  train: bool):
    """``with_transform`` returning ``pixel_values`` (3, R, R) in [-1, 1] and ``labels``, augmented if train."""

    def transform(batch: dict) -> dict:
        pixel_values = images_to_tensor(batch[image_column], resolution, data_args.center_crop)
        if train and (data_args.random_crop_padding > 0 or data_args.random_flip):
            pixel_values = random_crop_flip(pixel_values, data_args.random_crop_padding, data_args.random_flip)
        return {"pixel_values": list(pixel_values), "labels": batch[label_column]}

    return dataset.with_transform(transform)


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }


def optimisation_summary(args: TrainingArguments, model_args: ModelArguments) -> str:
    """One line for the model card: optimiser, lr schedule (and the backbone's share), total batch, precision,
    seed."""
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    recipe = ""
    if model_args.backbone_lr_ratio != 1.0:
        recipe += f", backbone lr x{model_args.backbone_lr_ratio:g}"
    if model_args.head_warmup_epochs > 0:
        recipe += f", head alone for the first {model_args.head_warmup_epochs:g} epochs"
    return (
        f"{getattr(args.optim, 'value', args.optim)}, lr {args.learning_rate:g} "
        f"({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, {args.warmup_steps:g} warm-up steps)"
        f"{recipe}, weight decay {args.weight_decay:g}, batch {batch}, {precision}, seed {args.seed}"
    )


class ArgumentParser(OneLineErrors, HfArgumentParser):
    """``HfArgumentParser`` whose errors are one line with exit status 2."""


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = ArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog=PROG)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments.__post_init__ refuses inconsistent flags
        raise UsageError(str(error)) from None
    if training_args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {training_args.seed}.")
    model_args.model_name_or_path = check_source(model_args.model_name_or_path, "--model_name_or_path")
    data_args.dataset_name = check_source(data_args.dataset_name, "--dataset_name")
    return model_args, data_args, training_args


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    if model_args.lora_r < 0:
        raise UsageError(f"--lora_r must be >= 0, got {model_args.lora_r}.")
    if model_args.lora_r and model_args.freeze_backbone:
        raise UsageError("--freeze_backbone and --lora_r are exclusive: LoRA already freezes the base weights.")
    if model_args.backbone_lr_ratio <= 0 or model_args.head_warmup_epochs < 0:
        raise UsageError(
            "--backbone_lr_ratio must be > 0 and --head_warmup_epochs >= 0 (use --freeze_backbone to never "
            f"train the backbone); got {model_args.backbone_lr_ratio:g} and {model_args.head_warmup_epochs:g}."
        )
    if model_args.freeze_backbone and (model_args.backbone_lr_ratio != 1.0 or model_args.head_warmup_epochs):
        raise UsageError(
            "--freeze_backbone never trains the backbone: drop --backbone_lr_ratio and --head_warmup_epochs."
        )
    check_writable_dir(training_args.output_dir)
    repo_id = None
    if training_args.push_to_hub:  # a bad id or token fails now, not after training
        repo_id = create_hub_repo(
            training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir)),
            token=training_args.hub_token, private=training_args.hub_private_repo,
        )

    if data_args.eval_split == data_args.train_split:
        raise UsageError(
            f"--eval_split {data_args.eval_split!r} is the training split: the accuracy would be measured on "
            "training images. Pass a held-out split (e.g. --eval_split test), or an empty one to skip evaluation."
        )
    name, config_name = data_args.dataset_name, data_args.dataset_config_name
    train_ds = load_split(name, data_args.train_split, data_args.max_train_samples, config_name)
    eval_ds = None
    if data_args.eval_split:
        eval_ds = load_split(name, data_args.eval_split, data_args.max_eval_samples, config_name)
    image_column = detect_image_column(train_ds, data_args.image_column)
    label_column = detect_label_column(train_ds, data_args.label_column)
    names = label_names(train_ds, label_column)
    num_labels = len(names) if names else int(max(train_ds[label_column])) + 1
    id2label = dict(enumerate(names)) if names else None

    model = build_model(model_args, num_labels, id2label)
    resolution = data_args.resolution or model.config.image_size
    if resolution != model.config.image_size:
        raise UsageError(
            f"--resolution {resolution} does not match the model's {model.config.image_size}x"
            f"{model.config.image_size} input: drop --resolution or pass {model.config.image_size}."
        )
    processor = DDAEImageProcessor(size=resolution, do_center_crop=data_args.center_crop)
    train_set = prepare_split(train_ds, image_column, label_column, resolution, data_args, train=True)
    eval_set = None
    if eval_ds is not None:
        eval_set = prepare_split(eval_ds, image_column, label_column, resolution, data_args, train=False)

    base_model = model
    if model_args.train_vae:
        if model.vae is None:
            raise UsageError("--train_vae needs a latent model (one with a VAE); this one works on pixels.")
        model.config.freeze_vae = False
        model.vae.requires_grad_(True)
    if model_args.freeze_backbone:
        model.denoiser.requires_grad_(False)
    if model_args.lora_r:
        model = add_lora(model, model_args)

    accuracy, accuracy_source = load_accuracy(data_args.accuracy_metric)

    evaluated = {}  # which test images the last evaluation got right, kept for all_results.json

    def compute_metrics(prediction) -> dict:
        predicted = np.argmax(prediction.predictions, axis=-1)
        evaluated["correct"] = predicted == prediction.label_ids
        return {"accuracy": accuracy(predicted, prediction.label_ids)}

    training_args.push_to_hub = False  # the final model is pushed below, with its DDAE model card
    training_args.remove_unused_columns = False  # the on-the-fly transform needs the raw image column
    training_args.label_names = ["labels"]
    callbacks = []
    if model_args.head_warmup_epochs > 0:
        callbacks.append(HeadWarmup(backbone_parameters(model), model_args.head_warmup_epochs))
    trainer = DDAETrainer(
        model=model,
        backbone_lr_ratio=model_args.backbone_lr_ratio,
        callbacks=callbacks,
        args=training_args,
        data_collator=collate,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        compute_metrics=compute_metrics if eval_set is not None else None,
    )
    train_result = trainer.train()
    metrics = dict(train_result.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        # the 95% Wilson interval, and the per-image results a paired test against another run needs
        # (ddae_diffusers.probing.stats.compare on two runs' unpacked eval_correct)
        metrics["eval_accuracy_ci95"] = accuracy_entry(evaluated["correct"])["ci95"]
        metrics["eval_correct"] = pack_correct(evaluated["correct"])

    if model_args.lora_r:
        if trainer.is_world_process_zero():
            model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
        final = model.merge_and_unload()
    else:
        final = base_model
    protocol = (
        "linear probe through the Trainer (frozen backbone)" if model_args.freeze_backbone
        else f"LoRA fine-tuning (r={model_args.lora_r}, alpha={model_args.lora_alpha})" if model_args.lora_r
        else "full fine-tuning"
    )
    previous = final.config.training_summary or {}
    final.config.training_summary = {
        **({"grid": previous["grid"]} if previous.get("grid") else {}),
        "model_name": os.path.basename(os.path.normpath(training_args.output_dir)),
        "protocol": protocol,
        "dataset": data_args.dataset_name,
        "train_split": data_args.train_split,
        "eval_split": data_args.eval_split,
        "num_train": len(train_ds),
        "num_eval": len(eval_ds) if eval_ds is not None else None,
        "epochs": training_args.num_train_epochs,
        "optimisation": optimisation_summary(training_args, model_args),
        "train_runtime_s": metrics.get("train_runtime"),
        "accuracy": metrics.get("eval_accuracy"),
        "accuracy_ci95": metrics.get("eval_accuracy_ci95"),
        "accuracy_source": accuracy_source,
        "license": model_args.license,
        "hub_model_id": training_args.hub_model_id,
    }
    if trainer.is_world_process_zero():
        final.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
        trainer.save_metrics("all", metrics, combined=False)
        if repo_id is not None:
            final.push_to_hub(repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
    return metrics


def cli(argv: list[str] | None = None) -> None:
    """The command: a usage error is one line and exit status 2."""
    run_command(PROG, lambda: main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    cli()
