"""The metasent service: REST API and command line."""
