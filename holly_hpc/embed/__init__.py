"""Representation learning for bioimages: the `embed` task kind.

resnet.py      ResNet encoders (BasicBlock, Bottleneck, ResNetEncoder) for any crop size and channel count.
decoder.py     the mirrored decoder: a small seed grid upsampled to an image of the requested size.
models.py      the families (AutoEncoder, VAE / β-VAE, VQVAE with an EMA codebook), ChannelFoldingWrapper
               (one single-channel model shared across channels) and normalise_per_channel.
shape.py       contours -> distance matrices, the start- and reflection-invariant loss, classical MDS,
               region properties, DistanceMatrixAutoEncoder.
synthetic.py   generated two-channel cells of classes that differ in outline and texture.
data.py        splits, normalisation, sizing, seeded batches and augmentations (also used by gan/).
task.py        the kind; export.py: embeddings to zarr; evaluation.py: classifier probes vs baselines;
infer.py       `holly-hpc embed`.
"""
