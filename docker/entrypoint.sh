#!/bin/sh
# Entrypoint of every queueformer image: turn mounted secret files into environment variables, then
# exec the command (so it is PID 1 and gets SIGTERM directly: a worker's warm shutdown depends on it).
#
# queueformer itself reads top-level settings from files in $QUEUEFORMER_SECRETS_DIR, but not nested
# ones (QUEUEFORMER_API__BOOTSTRAP_KEYS), and boto3 and Flower read only their environment. Compose
# mounts `secrets:` as files in /run/secrets, so each file named like one of the variables below is
# exported under its upper-case name. A variable already set in the environment wins. Kubernetes pods
# get their secrets as env (secretKeyRef) and have no such directory, so there this does nothing.
set -eu

secrets_dir="${QUEUEFORMER_SECRETS_DIR:-/run/secrets}"
if [ -d "$secrets_dir" ]; then
    for file in "$secrets_dir"/*; do
        [ -f "$file" ] || continue
        name=$(basename "$file" | tr '[:lower:]' '[:upper:]')
        case "$name" in
            *[!A-Z0-9_]*) continue ;;  # not a shell variable name
        esac
        case "$name" in
            QUEUEFORMER_* | AWS_ACCESS_KEY_ID | AWS_SECRET_ACCESS_KEY | AWS_SESSION_TOKEN | FLOWER_BASIC_AUTH | HF_TOKEN) ;;
            *) continue ;;
        esac
        if eval "[ -z \"\${$name+set}\" ]"; then
            # $(cat) drops trailing newlines, which editors like to leave in secret files.
            value=$(cat "$file")
            export "$name=$value"
        fi
    done
fi

# Celery (and so Flower) reads its broker from CELERY_BROKER_URL; keep the URL off the command line.
if [ -z "${CELERY_BROKER_URL:-}" ] && [ -n "${QUEUEFORMER_REDIS_URL:-}" ]; then
    export CELERY_BROKER_URL="$QUEUEFORMER_REDIS_URL"
fi

exec "$@"
