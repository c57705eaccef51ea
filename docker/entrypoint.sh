#!/bin/sh
# Entry point of the image: export the PostgreSQL password from its secret file (libpq reads
# PGPASSWORD, so it stays out of command lines and URIs), then run the command.
set -eu
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ] && [ -f "$POSTGRES_PASSWORD_FILE" ]; then
    PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"
    export PGPASSWORD
fi
exec "$@"
