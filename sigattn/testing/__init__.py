"""The lab's correctness wing: the checks that run the library on a GPU and judge it.

``tolerance``    the tolerance rule (flash-attn's) and its named variants, for every check of the project
``grid``         the kernels' correctness grid: ``python -m sigattn.testing.grid [--quick] [--json PATH]``
``distributed``  context parallelism on N GPUs: ``torchrun --nproc-per-node N -m sigattn.testing.distributed``

The library never imports this package (tests/test_layers.py); it uses the library's public names.
"""
