"""Cell counting and localisation from dot annotations: SAU-Net, inverse distance kernels and
focal-consistency self-supervised learning (Guo et al. 2022), in JAX/Flax.

    import cellcount_jax
    model = cellcount_jax.load_model("workdir/quickstart")   # a model folder
    cells = model.detect(image)   # .pixels, .physical, .density, .count_corrected
    cells = model.detect(image, diameter="auto")   # cells larger or smaller than the model's
    density = model.density(image)
"""


def load_model(workdir: str):
    """The model folder `workdir` (a training workdir, or a shipped model such as
    'pretrained/vgg2d_cpu') as a `predictor.Predictor` with `density(image)` and
    `detect(image)`."""
    from cellcount_jax import cli, model_folder
    return model_folder.load_model(cli.model_path(workdir))
