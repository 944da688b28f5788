from medlego.cli import main

raise SystemExit(main())
