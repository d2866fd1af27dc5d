#!/usr/bin/env python3
"""Writes the seed corpora, corpus/<target>/<name>: handcrafted valid inputs.

An input is [settings, split, bytes...] (see src/lib.rs): the low nibble of
settings picks max_package_size (15: 1 MiB, 8: 64, 6: 8, 4: 4), the high
nibble the target's flags; split how bytes are cut into reads.
"""
import os
import struct

BIG, M64, M8, M4 = 15, 8, 6, 4


def seed(target, name, settings, split, data):
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([settings, split]) + data)


def ws_frame(opcode, payload, fin=True, mask=None):
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([m | n])
    elif n <= 0xFFFF:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def client(opcode, payload, fin=True):
    return ws_frame(opcode, payload, fin, b"\x12\x34\x56\x78")


seed("text", "lines", BIG, 3, b"hello\nwor ld\r\n\na\rb\n")
seed("text", "at-the-limit", M8, 0, b"0123456\n01234567\n")

seed("frame", "three", BIG, 2, b"\0\0\0\x09jhdxr\0\0\0\x04\0\0\0\x05!")
seed("frame", "small-max", M4, 0, b"\0\0\0\x04\0\0\0\x05!")

seed("custom", "netstrings", BIG, 1, b"5:hello,0:,3:abc,")
seed("custom", "length-prefix", 0x10 | BIG, 1, b"\0\x05hello\0\0\0\x03abc")

HOST = b"Host: example.test\r\n"
seed("http", "get", BIG, 4, b"GET /a/b?x=1&y HTTP/1.1\r\n" + HOST + b"Accept: */*\r\n\r\n")
seed("http", "pipelined", BIG, 2,
     b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
     b"POST /p HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nxyz"
     b"PUT /c HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
     b"2;ext=1\r\nab\r\n0\r\nTrailer: t\r\n\r\n")
seed("http", "expect-continue", BIG, 5,
     b"POST /u HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
seed("http", "absolute-form", BIG, 7,
     b"OPTIONS http://example.test/x?q HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
# The decoder alone, header limit 64 (flags 1 and 2).
seed("http", "decoder-small-head", 0x30 | M64, 1,
     b"GET / HTTP/1.1\r\nHost: h\r\n\r\nPOST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")

UPGRADE = (b"GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
FRAMES = (client(1, "héllo".encode()) + client(2, bytes(range(200)))
          + client(1, b"frag", fin=False) + client(9, b"p") + client(0, b"ment")
          + client(10, b"") + client(8, struct.pack(">H", 1000) + b"bye"))
seed("websocket_server", "upgrade-then-frames", BIG, 3, UPGRADE + FRAMES)
seed("websocket_server", "frames-only", 0x10 | BIG, 6, FRAMES)
seed("websocket_server", "refused", 0x20 | BIG, 4, UPGRADE + client(1, b"late"))
seed("websocket_server", "over-max", M64, 2, UPGRADE + client(2, bytes(65)))

ANSWER = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\nSec-WebSocket-Accept: $ACCEPT\r\n\r\n")
SERVER = (ws_frame(1, b"hi") + ws_frame(9, b"ping") + ws_frame(2, bytes(300))
          + ws_frame(1, b"a", fin=False) + ws_frame(0, b"b") + ws_frame(8, b""))
seed("websocket_client", "answer-then-frames", BIG, 3, ANSWER + SERVER)
seed("websocket_client", "frames-only", 0x10 | BIG, 5, SERVER)
seed("websocket_client", "refused", BIG, 2, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
