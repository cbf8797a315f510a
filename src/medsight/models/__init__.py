"""Models: timm backbones, custom CNNs, attention blocks and transfer-learning helpers."""
