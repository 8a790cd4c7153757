"""The harness the end-to-end tests share, one concern a module:

* commands.py: running commands (with timeouts), waiting, stopping our own processes by
  PID, the mount table, apt-get for what is missing;
* dockerd.py: the tests' private dockerd (own data root, exec root, socket, pid file,
  containerd namespaces), reached through DOCKER_HOST;
* image.py: the busybox image, made from the host's static busybox.

The fixtures that use them live beside the tests: tests/e2e/conftest.py (the session's
dockerd, image and plugin), and the Podman, socket-activation and Swarm modules.
"""
