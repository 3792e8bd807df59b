"""One module per `reffuse` subcommand; reffuse/cli.py lists them."""
