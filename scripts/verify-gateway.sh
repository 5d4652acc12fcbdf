#!/usr/bin/env bash
# Checks a deployed gateway end to end, as an operator would after
# installing it in front of InfraBox (README "In front of an existing
# InfraBox"):
#
#   MCP_VERIFY_SESSION=<your InfraBox session JWT> scripts/verify-gateway.sh https://infrabox.example.com <project-id>
#
# The session is the value of InfraBox's `token` cookie after you sign in
# (taken from the environment, so it is in neither the process list nor
# the shell history); the project is one you collaborate on. Steps:
#   1. create an MCP token with the session (the token API),
#   2. read the project through the MCP surface with it (200),
#   3. use it on InfraBox's own API, off the MCP namespace (403),
#   4. revoke it, and see the edge refuse it (401).
# Prints one line per step and never the token; exits 1 at the first step
# that fails, revoking what it created. Needs curl and python3.
set -uo pipefail

url="${1:-}"
project="${2:-}"
session="${MCP_VERIFY_SESSION:-}"
if [ -z "$url" ] || [ -z "$project" ] || [ -z "$session" ]; then
  echo "usage: MCP_VERIFY_SESSION=<InfraBox session JWT> $0 <gateway URL> <project id>" >&2
  exit 2
fi
url="${url%/}"
for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "verify: $tool is required" >&2; exit 2; }
done

tmp=$(mktemp -d)
token_id=""
cleanup() {
  if [ -n "$token_id" ]; then
    curl -s -o /dev/null -X DELETE "$url/api/v1/mcp/tokens/$token_id" -H "Authorization: Bearer $session" || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# call METHOD PATH AUTH [BODY]: the status on stdout, the body in $tmp/body.
call() {
  local method="$1" path="$2" auth="$3" body="${4:-}"
  local args=(-s -o "$tmp/body" -w '%{http_code}' -X "$method" "$url$path" -H "Authorization: Bearer $auth")
  if [ -n "$body" ]; then
    args+=(-H 'Content-Type: application/json' --data "$body")
  fi
  curl "${args[@]}" || echo 000
}

# field NAME: a top-level field of the last JSON body ("" if none).
field() {
  python3 -c 'import json,sys
try:
    v = json.load(open(sys.argv[1])).get(sys.argv[2], "")
except Exception:
    v = ""
print(v if isinstance(v, str) else json.dumps(v))' "$tmp/body" "$1"
}

fail() {
  echo "FAIL: $1 (HTTP $2, error \"$(field error)\": $(field message))"
  exit 1
}

# 1. A token for this project, through the token API.
status=$(call POST /api/v1/mcp/tokens "$session" "{\"name\":\"gateway-verify\",\"enabled_projects\":{\"$project\":null},\"expires_days\":1}")
[ "$status" = 201 ] || fail "creating a token with the session" "$status"
token_id=$(field token_id)
token=$(field token)
echo "ok: created MCP token $token_id through the token API"

# 2. A read route through the MCP surface (the token reaches the edge
# within a second or two).
for _ in $(seq 1 50); do
  status=$(call GET "/api/v1/mcp/projects/$project" "$token")
  [ "$status" = 200 ] && break
  sleep 0.2
done
[ "$status" = 200 ] || fail "reading the project through /api/v1/mcp/" "$status"
echo "ok: GET /api/v1/mcp/projects/$project answered 200 (forwarded to InfraBox with your InfraBox credential)"

# 3. The same token on InfraBox's own API: refused by the gateway.
status=$(call GET "/api/v1/projects/$project" "$token")
[ "$status" = 403 ] && [ "$(field error)" = mcp_token_not_accepted ] || fail "the MCP token off the MCP namespace must be refused" "$status"
echo "ok: GET /api/v1/projects/$project with the MCP token answered 403 mcp_token_not_accepted"

# 4. Revoke it; the edge refuses it.
status=$(call DELETE "/api/v1/mcp/tokens/$token_id" "$session")
[ "$status" = 200 ] || fail "revoking the token" "$status"
revoked="$token_id"
token_id=""
for _ in $(seq 1 50); do
  status=$(call GET "/api/v1/mcp/projects/$project" "$token")
  [ "$status" = 401 ] && break
  sleep 0.2
done
[ "$status" = 401 ] || fail "the revoked token must be refused at the edge" "$status"
echo "ok: revoked $revoked; the edge answers 401 invalid_token"
echo "verify: the gateway in front of $url works"
