"""elastictrain: fault-tolerant distributed training for segmentation-models-pytorch."""

__version__ = "0.1.0"
