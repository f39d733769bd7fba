from ksm.cli import main

raise SystemExit(main())
