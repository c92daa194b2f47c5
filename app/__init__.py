"""User entry points: the ``clear-dit`` command line and the Gradio web UI."""
