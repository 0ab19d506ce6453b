from tprun.cli import main

raise SystemExit(main())
