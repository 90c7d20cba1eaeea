"""DL/T 645-2007 meters for the DL/T 645 tests, played by the `dlt645`
package's meter service (a third-party implementation of the standard:
its frame codec, BCD formats and data identifiers, its TCP and serial
servers).

Usage:
  dlt645_meter.py tcp PORT ADDRESS...   one TCP listener (a serial device
                                        server) with these meters behind it
  dlt645_meter.py serial PATH ADDRESS... these meters on a serial port (one
                                        end of a pty pair made with socat)

ADDRESS is a 12-digit meter address as printed on the meter. Every meter
holds the values of VALUES below (the gateway's tests check them, scaled as
the standard says); the meter at position n (0-based) adds n to phase A's
voltage, so meters are told apart. A DI the meter does not hold is answered
with an error frame (error byte 0x02, "no data requested"). A frame to an
address not listed goes unanswered, as on a bus where that meter is dead.
Prints "ready" once listening.
"""

import sys
import time

from dlt645 import MeterServerService, RtuServer, TcpServer

# DI -> value, as the package's setters take them.
ENERGY = {
    0x00000000: 12345.67,  # combined active, total (kWh)
    0x00010000: 23456.78,  # forward active, total
    0x00020000: 345.67,  # reverse active, total
    0x00150000: 7000.01,  # phase A forward active
    0x00290000: 8000.02,  # phase B forward active
    0x003D0000: 9000.03,  # phase C forward active
}
VARIABLES = {
    0x02010100: 220.1,  # phase A voltage (V, XXX.X)
    0x02010200: 221.2,
    0x02010300: 222.3,
    0x02020100: 5.123,  # phase A current (A, XXX.XXX)
    0x02020200: -6.234,  # a negative current: sign bit
    0x02020300: 7.345,
    0x02030000: 3.4567,  # total active power (kW, XX.XXXX)
    0x02030100: 1.1234,
    0x02030200: 1.2345,
    0x02030300: 1.0988,
    0x02060000: 0.987,  # total power factor (X.XXX)
    0x02800002: 50.01,  # frequency (Hz, XX.XX)
}
PARAMETERS = {
    0x04000101: "24051705",  # date and week: 2024-05-17, Friday (YYMMDDWW)
    0x04000102: "123456",  # time 12:34:56 (hhmmss)
}


class Bus:
    """Routes each request to the meter it is addressed to; broadcast
    requests (read address) go to the first meter."""

    def __init__(self, addresses):
        self.meters = {}
        self.first = None
        for n, text in enumerate(addresses):
            meter = MeterServerService(None)
            # The address field travels least significant byte first.
            wire = bytes.fromhex(text)[::-1]
            meter.set_address(wire)
            for di, v in ENERGY.items():
                assert meter.set_00(di, v), hex(di)
            for di, v in VARIABLES.items():
                if di == 0x02010100:
                    v = round(v + n, 1)
                assert meter.set_02(di, v), hex(di)
            for di, v in PARAMETERS.items():
                assert meter.set_04(di, v), hex(di)
            # Meter number (表号): "2024" and the address's last 8 digits.
            assert meter.set_04(0x04000402, "2024" + text[-8:])
            self.meters[wire] = meter
            self.first = self.first or meter

    def handle_request(self, frame):
        addr = bytes(frame.addr)
        if addr == b"\xaa" * 6:
            return self.first.handle_request(frame)
        meter = self.meters.get(addr)
        if meter is None:
            return None
        return meter.handle_request(frame)


def main():
    kind, where, addresses = sys.argv[1], sys.argv[2], sys.argv[3:]
    bus = Bus(addresses)
    if kind == "tcp":
        server = TcpServer("127.0.0.1", int(where), 5.0, bus)
    else:
        server = RtuServer(where, 8, 1, 2400, "E", 1.0, bus)
    if not server.start():
        print(f"cannot start the {kind} server on {where}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
