"""Controller-agent contract (package flux.fleet.v1) and its generated stubs."""
