"""The lab's measuring wing: ``sigattn bench``.

``command``    the command's options and the choice of sweep (``sigattn.cli`` registers it)
``sweep``      speed and memory against softmax baselines (the default sweep and ``--memory``)
``inference``  ``--decode`` (KV-cache bandwidth) and ``--varlen`` (packed sequences)

The library never imports this package (tests/test_layers.py); it uses the library's public names.
"""
