"""jaxtricks.lm: a Flax NNX transformer language-model trainer built on the jaxtricks transforms.

Its dependencies are the ``train`` extra: ``pip install 'jaxtricks[train]'``. Read
:func:`jaxtricks.lm.training.run` for the whole of training.
"""
