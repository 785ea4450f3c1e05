"""Flux's development tools: the local fleet behind `flux dev` (`fleet.py`, its hosts as network
namespaces in `hosts.py`) and the demo (`demo.py`). They install packages, start clusters, Docker
engines and namespaces on the machine they run on, so they are not part of the shipped packages
(packaging/deb/build.py leaves them out): `flux dev` works from a source checkout."""
