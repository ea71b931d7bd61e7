"""metasent: few-shot sentiment adaptation with a meta-learned BERT-family encoder.

One import name, three layers (imports flow one way, ``data <- meta <- app``, with the command
line, :mod:`metasent.cli`, above them all):

- :mod:`metasent.data`: dataset readers, the task registry and the N-way K-shot episode sampler;
- :mod:`metasent.meta`: the model, the one adaptation API, the algorithm registry, meta-training,
  checkpoints and evaluation;
- :mod:`metasent.app`: the REST service (FastAPI), its domain store, client and settings.

The source folders ``app/``, ``meta/`` and ``data/`` sit at the top of the repository; the wheel
maps them under ``metasent`` (setuptools ``package-dir``), and in a checkout the links
``metasent/app``, ``metasent/meta`` and ``metasent/data`` point at them, so that tools run from
the repository (pytest, mypy) see the same names as an installed copy.
"""

__version__ = "0.1.0"
