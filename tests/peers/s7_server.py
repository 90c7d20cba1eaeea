"""A Siemens S7 PLC for the S7 tests, played by python-snap7's server (a
third-party S7comm implementation, pure Python since 3.0).

Usage: s7_server.py PORT. Serves DB1 (64 bytes) and the markers (M, 16
bytes) with the values below, DB1.DBW40 counting up every 100 ms, and
prints "ready" once listening. DB99 does not exist.
"""

import struct
import sys
import time

from snap7.server import Server
from snap7.type import SrvArea

port = int(sys.argv[1])
db1 = bytearray(64)
struct.pack_into(">H", db1, 0, 4242)  # DB1.DBW0 u16
struct.pack_into(">h", db1, 2, -1234)  # DB1.DBW2 i16
struct.pack_into(">f", db1, 4, -0.1)  # DB1.DBD4 f32
struct.pack_into(">i", db1, 8, -100000)  # DB1.DBD8 i32
struct.pack_into(">I", db1, 12, 3000000000)  # DB1.DBD12 u32
struct.pack_into(">d", db1, 16, 12345.678)  # DB1.DBD16 f64 (LReal)
db1[24] = 0b00001000  # DB1.DBX24.3 true, DB1.DBX24.2 false
db1[25] = 200  # DB1.DBB25 u8
db1[26:38] = bytes([10, 5]) + b"hello" + bytes(5)  # DB1.DBB26 STRING[10]
markers = bytearray(16)
struct.pack_into(">H", markers, 10, 777)  # MW10

server = Server(log=False)
server.register_area(SrvArea.DB, 1, db1)
server.register_area(SrvArea.MK, 0, markers)
server.start(tcp_port=port)
print("ready", flush=True)
count = 0
while True:
    time.sleep(0.1)
    count = (count + 1) % 65536
    struct.pack_into(">H", db1, 40, count)  # DB1.DBW40 counter
