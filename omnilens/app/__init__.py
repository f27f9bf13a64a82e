"""What users run: the ``omnilens`` command line."""
