"""Diffusers pipelines of ddae-diffusers (installed as ``ddae_diffusers.pipelines``)."""

from .pipeline_ddae import DDAEClassificationOutput, DDAEPipeline

__all__ = ["DDAEClassificationOutput", "DDAEPipeline"]
