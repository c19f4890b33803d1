"""A ZODB client that commits and reads through a zeoraid server.

Start the demo cluster first (`make demo`), then:

    .venv/bin/python examples/client.py [HOST:PORT]
"""
import sys

import ZEO


def main(argv=sys.argv[1:]):
    host, _, port = (argv[0] if argv else '127.0.0.1:8100').rpartition(':')
    db = ZEO.DB((host or '127.0.0.1', int(port)))
    try:
        with db.transaction() as conn:
            root = conn.root()
            root['visits'] = root.get('visits', 0) + 1
        with db.transaction() as conn:
            print('visits:', conn.root()['visits'])
    finally:
        db.close()


if __name__ == '__main__':
    main()
