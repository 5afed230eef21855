#!/usr/bin/env python3
"""SMTP sink for keyrotd's tests: accepts every message on loopback and writes each one to a folder.

Usage: smtp_sink.py PORT DIR

Each message is written atomically as DIR/<n>.eml (the raw message as received, with the
envelope recipients in an X-Sink-Rcpt header), so a test can list and parse the folder.
"""
import os
import sys
import itertools
import threading

from aiosmtpd.controller import Controller

counter = itertools.count(1)


class FolderHandler:
    def __init__(self, folder):
        self.folder = folder

    async def handle_DATA(self, server, session, envelope):
        n = next(counter)
        header = "X-Sink-Rcpt: " + ", ".join(envelope.rcpt_tos) + "\r\n"
        data = envelope.original_content or envelope.content
        tmp = os.path.join(self.folder, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(header.encode() + data)
        os.replace(tmp, os.path.join(self.folder, f"{n:06d}.eml"))
        return "250 OK"


def main():
    port, folder = int(sys.argv[1]), sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    controller = Controller(FolderHandler(folder), hostname="127.0.0.1", port=port)
    controller.start()
    print(f"smtp sink on 127.0.0.1:{port} writing to {folder}", flush=True)
    try:
        threading.Event().wait()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
