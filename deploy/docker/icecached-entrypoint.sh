#!/bin/sh
# Entry point of the icecached image.
#
#   <image> [--flag=value ...]     runs icecached with these flags
#   <image> icecache status         runs any other command (the CLI, a shell for debugging)
#
# It exec's the command, so that icecached is PID 1 and gets SIGTERM directly. Nothing else is
# set up here: the daemon makes both of its sockets connectable by any local uid (mode 0666,
# whatever the umask) and decides access itself: the attach socket admits only the uids of
# --allow_uids and --operator_uids (SO_PEERCRED), and on the control socket a caller without
# an attachment's token gets only health, reflection, GetStats and GetConfig (deploy/README.md,
# "Security").
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- icecached "$@"
fi
exec "$@"
