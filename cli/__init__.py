"""The flux command-line interface: a thin front end over the controller's HTTP API."""
