"""The contract between the controller and its agents: job kinds with typed parameters and
results, failure kinds, and the names both sides derive from a project.

Plain Python only (no grpc, psycopg or docker): the controller validates what it sends and
receives with it, the agent what it runs and returns.
"""
