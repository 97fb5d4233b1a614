"""Generative models for cell images (the `generate` task kind).

models.py     InfoGAN: DCGAN-style generator, discriminator with a shared trunk and Q head, latent codes,
              adversarial losses (standard non-saturating or hinge) and the mutual-information bound.
metrics.py    clustering accuracy by the Hungarian method, sample diversity.
traversal.py  latent traversal grids and GIFs.
task.py       the kind; sample.py: `holly-hpc sample`.
"""
