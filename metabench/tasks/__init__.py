"""Tasks: the shipped task files (package data) and the code that reads (``spec``), checks
(``validate``) and calibrates (``calibrate``) them. Importing the package loads nothing else:
``metabench.tasks.spec`` reads a task without JAX, so the static site can."""
