"""One module per `dymu-video` subcommand."""
