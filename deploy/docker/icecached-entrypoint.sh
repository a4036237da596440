#!/bin/sh
# Entry point of the icecached image.
#
#   <image> [--flag=value ...]     runs icecached with these flags
#   <image> icecache status         runs any other command (the CLI, a shell for debugging)
#
# It sets the file-creation mask before exec'ing the daemon (which then is PID 1 and gets
# SIGTERM directly). The control socket is created by gRPC with mode 0777 & ~umask: under the
# usual 022 only the daemon's own uid could connect to it, so clients of another uid admitted
# by --allow-uids could attach (the attach socket is always 0666) but not create sequences.
# With 0002 (ICECACHE_UMASK) the daemon's group may connect too: engine containers of another
# uid join that group (Kubernetes: supplementalGroups: [10001]); see deploy/README.md.
set -eu
umask "${ICECACHE_UMASK:-0002}"
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- icecached "$@"
fi
exec "$@"
