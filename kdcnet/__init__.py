"""KDC-Net for partially relevant video retrieval: data, model, losses, training, evaluation, CLI.

Built on the public ops of :mod:`kdc_kernels`; run ``kdcnet train`` (or ``python -m kdcnet train``)
for the built-in synthetic demo.
"""
