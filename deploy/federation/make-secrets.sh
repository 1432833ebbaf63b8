#!/usr/bin/env bash
# Creates ./secrets for deploy/federation/docker-compose.yml (once; existing files are kept):
#   hub.pem / hub.pub.pem      the hub's ES256 key pair: it signs hub→site tokens, the sites trust the public key
#   <x>-jwt.secret             each gateway's HS256 secret for its own dev/analyst tokens (or set `jwks`)
#   site-<x>-db.password       each site's PostgreSQL password, and site-<x>-database.url built from it
# Usage: ./make-secrets.sh [DIR]   (default: ./secrets next to this script)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
rand() { openssl rand -base64 48 | tr -d '\n/+=' | cut -c1-48; }
if [ ! -f "$dir/hub.pem" ]; then
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$dir/hub.pem"
  openssl ec -in "$dir/hub.pem" -pubout -out "$dir/hub.pub.pem" 2>/dev/null
fi
for who in hub site-a site-b; do
  [ -f "$dir/$who-jwt.secret" ] || rand > "$dir/$who-jwt.secret"
done
for site in site-a site-b; do
  [ -f "$dir/$site-db.password" ] || rand > "$dir/$site-db.password"
  [ -f "$dir/$site-database.url" ] || \
    printf 'postgresql://fedgate:%s@pg-%s:5432/fedgate\n' "$(cat "$dir/$site-db.password")" "$site" > "$dir/$site-database.url"
done
# the containers read them as another user (secrets are bind-mounted with the host's permissions)
chmod 644 "$dir"/*
chmod 755 "$dir"
echo "secrets in $dir: $(cd "$dir" && ls | tr '\n' ' ')"
