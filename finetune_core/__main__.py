from finetune_core.cli import main

raise SystemExit(main())
