"""A Sparkplug B edge node built on pysparkplug (a third-party
implementation), driven line by line on stdin by the e2e tests.

Births declare every metric with name, alias and datatype; data messages
carry aliases only and no datatype (what the specification allows and
pysparkplug's low-level client does by default), so the host must take
both from the births.

Commands (one per line):
  birth            NBIRTH (seq 0) and DBIRTH of the device
  data <json>      DDATA of {metric: value}, values as JSON (bytes as a list of ints)
  gap              skip one seq number
  bad <metric>     DDATA with <metric> sent as a String while born Boolean, among good ones
  ddeath           DDEATH of the device
  reconnect        NDEATH, disconnect, connect again with bdSeq + 1 and new births
  quit
Prints one line per event: `connected`, `sent <what> seq <n>`, `rebirth requested`.
On an NCMD `Node Control/Rebirth` = true it publishes its births again.
"""

import argparse
import datetime
import json
import sys
import threading
import time

import pysparkplug as sp

METRICS = [
    # name, alias, datatype
    ("int8", 1, sp.DataType.INT8),
    ("int16", 2, sp.DataType.INT16),
    ("int32", 3, sp.DataType.INT32),
    ("int64", 4, sp.DataType.INT64),
    ("uint8", 5, sp.DataType.UINT8),
    ("uint16", 6, sp.DataType.UINT16),
    ("uint32", 7, sp.DataType.UINT32),
    ("uint64", 8, sp.DataType.UINT64),
    ("float", 9, sp.DataType.FLOAT),
    ("double", 10, sp.DataType.DOUBLE),
    ("boolean", 11, sp.DataType.BOOLEAN),
    ("string", 12, sp.DataType.STRING),
    ("datetime", 13, sp.DataType.DATETIME),
    ("text", 14, sp.DataType.TEXT),
    ("uuid", 15, sp.DataType.UUID),
    ("bytes", 17, sp.DataType.BYTES),
]
BY_NAME = {name: (alias, dt) for name, alias, dt in METRICS}
BIRTH_VALUES = {
    sp.DataType.FLOAT: 0.0,
    sp.DataType.DOUBLE: 0.0,
    sp.DataType.BOOLEAN: False,
    sp.DataType.STRING: "",
    sp.DataType.TEXT: "",
    sp.DataType.UUID: "",
    sp.DataType.BYTES: [],
    sp.DataType.DATETIME: 0,
}


def py_value(dt, v):
    if dt == sp.DataType.BYTES:
        return bytes(v)
    if dt == sp.DataType.DATETIME:
        # pysparkplug encodes int(timestamp() * 1000): exact for
        # milliseconds that are a binary fraction of a second (e.g. .125).
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return epoch + datetime.timedelta(milliseconds=v)
    return v


class Node:
    def __init__(self, args):
        self.a = args
        self.lock = threading.Lock()
        self.seq = 0
        self.bd_seq = 0
        self.client = None

    def say(self, line):
        print(line, flush=True)

    def topic(self, kind, device=True):
        return sp.Topic(
            message_type=kind,
            group_id=self.a.group,
            edge_node_id=self.a.node,
            device_id=self.a.device if device else None,
        )

    def publish(self, kind, payload, device=True, dtypes=False):
        msg = sp.Message(
            topic=self.topic(kind, device),
            payload=payload,
            qos=sp.QoS.AT_MOST_ONCE,
            retain=False,
        )
        self.client.publish(msg, include_dtypes=dtypes)

    def next_seq(self):
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def bd_metric(self):
        return sp.Metric(
            timestamp=sp.get_current_timestamp(),
            name="bdSeq",
            datatype=sp.DataType.INT64,
            value=self.bd_seq,
        )

    def births(self):
        with self.lock:
            self.seq = 0
            now = sp.get_current_timestamp()
            nbirth = sp.NBirth(timestamp=now, seq=self.next_seq(), metrics=(self.bd_metric(),))
            self.publish(sp.MessageType.NBIRTH, nbirth, device=False, dtypes=True)
            metrics = tuple(
                sp.Metric(
                    timestamp=now,
                    name=name,
                    alias=alias,
                    datatype=dt,
                    value=py_value(dt, BIRTH_VALUES.get(dt, 0)),
                )
                for name, alias, dt in METRICS
            )
            dbirth = sp.DBirth(timestamp=now, seq=self.next_seq(), metrics=metrics)
            self.publish(sp.MessageType.DBIRTH, dbirth, dtypes=True)
            self.say(f"sent births seq {self.seq}")

    def data(self, values, override=None):
        with self.lock:
            now = sp.get_current_timestamp()
            metrics = []
            for name, v in values.items():
                alias, dt = BY_NAME[name]
                if override == name:
                    dt = sp.DataType.STRING
                metrics.append(
                    sp.Metric(timestamp=now, name=None, alias=alias, datatype=dt, value=py_value(dt, v))
                )
            seq = self.next_seq()
            self.publish(sp.MessageType.DDATA, sp.DData(timestamp=now, seq=seq, metrics=tuple(metrics)))
            self.say(f"sent data seq {seq}")

    def on_ncmd(self, _client, message):
        for m in message.payload.metrics:
            if m.name == "Node Control/Rebirth" and m.value is True:
                self.say("rebirth requested")
                self.births()

    def connect(self):
        self.client = sp.Client(client_id=f"{self.a.group}-{self.a.node}-{self.bd_seq}")
        will = sp.Message(
            topic=self.topic(sp.MessageType.NDEATH, device=False),
            payload=sp.NDeath(timestamp=sp.get_current_timestamp(), bd_seq_metric=self.bd_metric()),
            qos=sp.QoS.AT_MOST_ONCE,
            retain=False,
        )
        self.client.set_will(will)
        self.client.subscribe(self.topic(sp.MessageType.NCMD, device=False), sp.QoS.AT_MOST_ONCE, self.on_ncmd)
        connected = threading.Event()
        self.client.connect("127.0.0.1", port=self.a.port, blocking=False, callback=lambda _c: connected.set())
        if not connected.wait(20):
            sys.exit("could not connect to the broker")
        self.say("connected")

    def ndeath(self):
        with self.lock:
            death = sp.NDeath(timestamp=sp.get_current_timestamp(), bd_seq_metric=self.bd_metric())
            self.publish(sp.MessageType.NDEATH, death, device=False, dtypes=True)
        time.sleep(0.2)
        self.client.disconnect()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--device", required=True)
    node = Node(p.parse_args())
    node.connect()
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "birth":
            node.births()
        elif cmd == "data":
            node.data(json.loads(arg))
        elif cmd == "gap":
            with node.lock:
                node.next_seq()
            node.say("skipped a seq")
        elif cmd == "bad":
            node.data({"int32": -7, arg: "not a boolean", "double": 2.5}, override=arg)
        elif cmd == "ddeath":
            with node.lock:
                node.publish(
                    sp.MessageType.DDEATH,
                    sp.DDeath(timestamp=sp.get_current_timestamp(), seq=node.next_seq()),
                )
            node.say("sent ddeath")
        elif cmd == "reconnect":
            node.ndeath()
            node.bd_seq += 1
            node.connect()
            node.births()
        elif cmd == "quit":
            break
    node.ndeath()


if __name__ == "__main__":
    main()
