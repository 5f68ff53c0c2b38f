"""Models users bring: standard CNNs written the way their communities write them, not adapted to jaxlrp.

Each module has a constructor and an ``init`` helper that returns seeded weights, drawn with NumPy on the shapes
the model declares (see :mod:`.common`: He-normal kernels, small random biases, and BatchNorm statistics and affine
parameters randomised a little, as if trained, so that no BatchNorm is the identity). ``jaxlrp.lrp`` explains all of them as they are: see ``tests/test_model_zoo.py`` and
``examples/cnn_gallery.py``. Import them from the repository root as ``examples.models`` (the gallery and the tests
put the root on ``sys.path``).

- :mod:`.vgg`: VGG-16 and VGG-16-BN (Flax linen).
- :mod:`.resnet`: ResNet-18 / ResNet-50 (Flax linen, in the style of Flax's ImageNet example).
- :mod:`.unet`: a small U-Net with a segmentation or classification head (Flax linen).
- :mod:`.conv1d`: a dilated 1D conv net for one-hot DNA sequences (Flax linen).
- :mod:`.nnx_resnet`: a ResNet basic block and a tiny classifier in Flax nnx.
- :mod:`.eqx_resnet`: the same in Equinox (stateful ``eqx.nn.BatchNorm`` in inference mode).
"""
