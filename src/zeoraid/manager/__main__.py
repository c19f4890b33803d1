"""``python -m zeoraid.manager`` runs zeoraid-manager."""
import sys

from zeoraid.manager.cli import main


sys.exit(main())
