from vdifs.cli.main import main

raise SystemExit(main())
