from sasq.cli import main

raise SystemExit(main())
