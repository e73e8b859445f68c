import os, sys  # python suites/imagenet/main.py [flags] = python -m suites imagenet [flags] (suites/common/entry.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from suites.common.entry import entry  # noqa: E402
main = entry(__file__)  # main(argv=None) -> exit code
if __name__ == "__main__": sys.exit(main())  # noqa: E701
