#!/bin/sh
# Create the secret files docker/compose.yaml mounts, with fresh random values. Existing files are kept,
# so re-running never changes a password a volume already depends on (Redis' AOF, MinIO's data).
#   sh docker/make-secrets.sh            # writes docker/secrets/
#   sh docker/make-secrets.sh DIR        # writes DIR instead
# The directory is private (0700); the files are 0644 because compose bind-mounts them with their host
# permissions and the containers run as other users (10001, Valkey's 999).
set -eu

dir="${1:-$(dirname "$0")/secrets}"
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

random() {
    # 32 characters from [A-Za-z0-9]: safe inside URLs, JSON and basic-auth strings without escaping.
    LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c "${1:-32}"
}

write() {  # write NAME VALUE, unless NAME exists
    if [ ! -s "$dir/$1" ]; then
        printf '%s' "$2" >"$dir/$1"
        chmod 0644 "$dir/$1"
        echo "created $dir/$1"
    fi
}

write redis_password "$(random 32)"
# The URL must carry the same password as the server, so it is derived from the file, not generated.
write queueformer_redis_url "redis://:$(cat "$dir/redis_password")@redis:6379/0"
write queueformer_api__bootstrap_keys "[\"admin:qf-$(random 40)\"]"
# Standard Webhooks form: whsec_ and the base64 of 32 random bytes (the key receivers verify with).
write queueformer_api__webhook_secret "whsec_$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
write flower_basic_auth "admin:$(random 24)"
# MinIO's root credentials (profile s3), which the API and workers also use as their S3 keys.
write aws_access_key_id "queueformer"
write aws_secret_access_key "$(random 40)"

echo "API key:     $(sed -e 's/^\["[^:]*:\(.*\)"\]$/\1/' "$dir/queueformer_api__bootstrap_keys")"
echo "Flower auth: $(cat "$dir/flower_basic_auth")"
