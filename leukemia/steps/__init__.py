"""The tracked steps, one module each: what a command runs, logged to MLflow.

Each step takes its resolved configuration, raises domain errors (``ValueError`` and its
subclasses) for bad input, and never calls ``sys.exit`` or click; the command line turns those
errors into one-line messages. The pure libraries beside this package (segmentation, data,
engine, metrics, evaluation maths, shortcut) import no MLflow.
"""
