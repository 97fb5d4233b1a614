"""Representation learning for bioimages (the coming `embed` task kind).

resnet.py   ResNet encoders (BasicBlock, Bottleneck, ResNetEncoder) for any crop size and channel count.
decoder.py  the mirrored decoder: a small seed grid upsampled to an image of the requested size.
models.py   the families (AutoEncoder, VAE / β-VAE, VQVAE with an EMA codebook), ChannelFoldingWrapper
            (one single-channel model shared across channels) and normalise_per_channel.
"""
