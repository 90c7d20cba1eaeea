"""A Siemens S7 PLC for the S7 tests, played by python-snap7's server (a
third-party S7comm implementation, pure Python since 3.0).

Usage: s7_server.py PORT. Serves DB1 (64 bytes), DB2 (16 bytes), the
markers (M, 16 bytes), timers and counters with the values below,
DB1.DBW40 counting up every 100 ms, and prints "ready" once listening.
DB99 does not exist. Its identity (SZL 0x0011, 0x001C) is python-snap7's.

s7_server.py PORT BLOCKS SIZE (for bench-s7): also serves DB10, DB11, ...
(BLOCKS of them, SIZE bytes each) holding f32 values.
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
struct.pack_into(">H", db1, 44, 0x3180)  # DB1.DBW44 DATE 2024-09-11
struct.pack_into(">I", db1, 48, 45296789)  # DB1.DBD48 TIME_OF_DAY 12:34:56.789
db1[52:60] = bytes([0x26, 0x12, 0x03, 0x13, 0x45, 0x07, 0x25, 0x05])  # DB1.DBB52 DT
db2 = bytearray(16)
db2[0:12] = struct.pack(">HBBBBBBI", 2026, 12, 3, 5, 13, 45, 7, 250000000)  # DB2.DBB0 DTL
struct.pack_into(">i", db2, 12, -1500)  # DB2.DBD12 TIME -1.5 s
markers = bytearray(16)
struct.pack_into(">H", markers, 10, 777)  # MW10
timers = bytearray(16)  # two bytes per timer
struct.pack_into(">H", timers, 2, 0x1123)  # T1 S5T#12s300ms
counters = bytearray(16)
struct.pack_into(">H", counters, 4, 0x0042)  # C2 42

server = Server(log=False)
server.register_area(SrvArea.DB, 1, db1)
server.register_area(SrvArea.DB, 2, db2)
bench_blocks = []
if len(sys.argv) > 3:
    for n in range(int(sys.argv[2])):
        block = bytearray(int(sys.argv[3]))
        for i in range(0, len(block) - 3, 4):
            struct.pack_into(">f", block, i, n * 1000 + i / 4 + 0.5)
        bench_blocks.append(block)
        server.register_area(SrvArea.DB, 10 + n, block)
server.register_area(SrvArea.MK, 0, markers)
server.register_area(SrvArea.TM, 0, timers)
server.register_area(SrvArea.CT, 0, counters)
server.start(tcp_port=port)
print("ready", flush=True)
count = 0
while True:
    time.sleep(0.1)
    count = (count + 1) % 65536
    struct.pack_into(">H", db1, 40, count)  # DB1.DBW40 counter
