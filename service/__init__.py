"""genserve: generative image models (PixelCNN, VAE, GAN) over REST, on ONNX Runtime."""

# The one version: the package's (pyproject.toml reads it from here), the OpenAPI document's and /v2's server
# metadata. The API's own major version is the /v1 in its paths.
__version__ = "0.1.0"
