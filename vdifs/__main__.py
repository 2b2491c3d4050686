from vdifs.cli import main

raise SystemExit(main())
