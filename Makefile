# Install docker-on-top as a socket-activated systemd service.
#
#   make                      build target/release/docker-on-top (cargo build --release)
#   sudo make install         install the binary and the units, enable and start the socket
#   sudo make uninstall       stop and disable, remove the binary and the units;
#                             never touches the volumes in /var/lib/docker-on-top
#
# PREFIX (default /usr/local) decides where the binary and the README (DOCDIR) go; the
# installed service's ExecStart and Documentation= follow them. DESTDIR stages the files
# elsewhere (for packaging) and skips systemctl.
# UNITDIR (default /etc/systemd/system) is where the units go.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= /etc/systemd/system
DOCDIR ?= $(PREFIX)/share/doc/docker-on-top
DESTDIR ?=
BIN ?= target/release/docker-on-top
STATE_DIR := /var/lib/docker-on-top
SYSTEMCTL ?= systemctl

.PHONY: all build install uninstall

all: build

build:
	cargo build --release --locked

install:
	@test -x "$(BIN)" || { echo "make install: $(BIN) is missing: run 'make' (or cargo build --release) first" >&2; exit 1; }
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(DOCDIR)"
	install -m 0755 "$(BIN)" "$(DESTDIR)$(BINDIR)/docker-on-top"
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/README.md"
	sed -e 's|^ExecStart=/usr/local/bin/docker-on-top|ExecStart=$(BINDIR)/docker-on-top|' \
		-e 's|^Documentation=file:///usr/local/share/doc/docker-on-top/|Documentation=file://$(DOCDIR)/|' \
		docker-on-top.service > "$(DESTDIR)$(UNITDIR)/docker-on-top.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/docker-on-top.service"
	install -m 0644 docker-on-top.socket "$(DESTDIR)$(UNITDIR)/docker-on-top.socket"
	@if [ -z "$(DESTDIR)" ]; then \
		set -x; \
		$(SYSTEMCTL) daemon-reload && \
		$(SYSTEMCTL) enable --now docker-on-top.socket && \
		$(SYSTEMCTL) try-restart docker-on-top.service; \
	else \
		echo "DESTDIR set: not running systemctl"; \
	fi

uninstall:
	@if [ -z "$(DESTDIR)" ]; then \
		set -x; \
		$(SYSTEMCTL) disable --now docker-on-top.socket docker-on-top.service || true; \
	fi
	rm -f "$(DESTDIR)$(UNITDIR)/docker-on-top.service" "$(DESTDIR)$(UNITDIR)/docker-on-top.socket"
	rm -f "$(DESTDIR)$(BINDIR)/docker-on-top" "$(DESTDIR)$(DOCDIR)/README.md"
	rmdir "$(DESTDIR)$(DOCDIR)" 2>/dev/null || true
	@if [ -z "$(DESTDIR)" ]; then set -x; $(SYSTEMCTL) daemon-reload; fi
	@echo "make uninstall: kept $(STATE_DIR) (the volumes and their changes); delete it yourself once you are sure nothing in it is needed"
