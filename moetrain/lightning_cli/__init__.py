"""The ``fit`` and ``validate`` subcommands of ``moetrain`` (:mod:`moetrain.cli`), built on Lightning's CLI::

    errors.py   bad input as one paragraph naming the file, line or key, and exit status 2
    help.py     how ``--help`` reads: moetrain's sections first, every key described
    app.py      the LightningCLI subclass: sections, defaults, checks before the build, checkpoints
    run.py      running a command, the help, and parsing without building anything
"""
