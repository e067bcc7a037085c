#!/usr/bin/env bash
# gpubuild-init: installs one pinned, verified package set into a shared volume.
# Written by `gpubuild init-script` for profile torch-cu121, digest 8efdcf1e1ab14b777bc3aedc7a8133b2093ab4b59d149ca2141790e06ce68d6d.
# Do not edit: regenerate it. Everything it installs is pinned below by sha256.
#
# Run-time settings (environment, all optional):
#   GPUBUILD_TARGET     install folder (default /shared-packages)
#   GPUBUILD_STORE_URL  the store (the folder holding blobs/), overriding the one written in
#   GPUBUILD_SAS        a SAS token appended to every blob URL (never printed)
#   GPUBUILD_SAS_FILE   a file holding the SAS token (a mounted Secret)
#   GPUBUILD_PARALLEL   shards downloaded at once (default: two per usable core, 4 to 16)
#   GPUBUILD_UNPACKERS  shards hashed and unpacked at once (default: the usable cores, that
#                       is nproc capped by the container's CPU limit, from its cgroup; at most
#                       GPUBUILD_PARALLEL and 256)
#   GPUBUILD_RETRIES    download attempts per shard (default 5); between two, a wait drawn at
#                       random from 0 to 1, 2, 4 ... 30 s (full jitter, so that many pods
#                       throttled at once do not come back at once), after what the store's
#                       Retry-After asked for (at most 300 s)
#   GPUBUILD_STALL_SECONDS  abort an attempt that moves under 1 KB/s this long (default 60;
#                       curl averages over its last ~5 s, so a stall shows a little later)
#   GPUBUILD_PYTHON     the interpreter for the pip fallback, when one is built in
#
# Layout of the target folder T (the volume's mount point, so T itself cannot be renamed):
#   T/<entries of the package set>    the live set: what PYTHONPATH=T sees
#   T/.gpubuild/lock                  flock'ed by the running copy (same volume)
#   T/.gpubuild/installed             "<digest> <source>" of the live set, written once it is
#                                     complete; source is "store" (verified) or "pip" (fallback)
#   T/.gpubuild/incomplete            present while the live set is being replaced
#   T/.gpubuild/download/<sha256>.part  a shard being downloaded (kept for resuming)
#   T/.gpubuild/staging-<digest>/     a set being unpacked; verified-<digest> once checked
#   T/.gpubuild/trash/                the previous set, moved aside, deleted after the switch
#
# Why only verified bytes are ever unpacked, and why it is safe to kill at any moment:
#   1. Each shard is downloaded into download/<sha256>.part (an interrupted download resumes
#      where it stopped, with an HTTP Range request), and its sha256 is checked against the pin
#      below before a single byte of it is unpacked: a shard that fails the check is deleted
#      and downloaded again, so nothing a rejected stream carried can reach the set.
#   2. Verified shards unpack in parallel into staging-<digest> (bsdtar, which decompresses
#      zstd in-process, or zstd -d | GNU tar), one per usable core at most while the other
#      downloads go on, after the whole directory skeleton exists:
#      parallel tar processes racing to create the same folders silently lose files
#      (pghoard#452; seen here: up to 48 of 12,699 files missing). Each shard's member count
#      and exit status are checked; shards are disjoint, so together they prove the tree's
#      file count without another pass over it. The live
#      set is not touched in this phase; a killed run leaves a staging folder that the next run
#      deletes (or reuses, when verified-<digest> says it was complete and checked).
#   3. The switch: write `incomplete`, remove `installed` and `verified-<digest>`, move the old
#      set's top-level entries into trash/, move the staged entries up (renames on one file
#      system), write `installed`, remove `incomplete` (last), then delete trash/.
#   4. A run that finds `incomplete` treats the live tree as nothing: it clears it and installs
#      again. So the live tree is always the old complete set, or counts as nothing; the next
#      run finishes the job. (A node crash can lose unsynced writes; an emptyDir dies with its
#      pod anyway.)
# The lock's file descriptor is inherited by every download: even the orphaned children of a
# killed run keep a second run waiting until they have exited. Everything the script creates
# it can also remove, as any user: folders are made writable before they are deleted.

set -euo pipefail
shopt -s nullglob dotglob

readonly DIGEST=8efdcf1e1ab14b777bc3aedc7a8133b2093ab4b59d149ca2141790e06ce68d6d
readonly PROFILE=torch-cu121
readonly DEFAULT_TARGET=/shared-packages
readonly DEFAULT_STORE_URL=https://gpucache.blob.core.windows.net/gpubuild/prod
readonly SHARD_COUNT=17
readonly TOTAL_BYTES=17119
readonly TOTAL_RAW_BYTES=85119
readonly TOTAL_FILES=379
readonly FALLBACK=pip
# Retries: a random wait in [0, min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2^(attempt-1))], after
# the Retry-After the store sent (capped: a hostile header must not park the pod for hours).
readonly BACKOFF_BASE_MS=1000
readonly BACKOFF_CAP_MS=30000
readonly RETRY_AFTER_MAX=300
# A SAS that runs out within this many seconds is warned about on every run.
readonly SAS_WARN_SECONDS=$(( 7 * 86400 ))

# One line per shard, largest first: sha256 (of the .tar.zst: its name in the store), bytes,
# files, BLAKE3 (of the same bytes; "-" when the manifest has none), packages.
shard_table() {
  cat <<'GPUBUILD_SHARDS'
77cbc27cb202acd1ec928e68c1d0661df80abe8ebe46a8a15320b458b157b165 1015 25 - triton
62cbf6a920411d2f9d0efa22b8e04b3e27502dbb7ad5bf09877837b8cc49cde6 1014 24 - torchvision
5ff363c288872a50a6e8aa8adb005fe6f8c9feb57f490ec9d12d9fd871868bd3 1013 23 - torch
fe1fd5568380f98e47cb9c6d75d09b149c33e0a47088ce53e468d66f7f2f8ebb 1012 22 - onnxruntime-gpu
cfb122e916730b10c15e458af91d640b750b3693d96cebbff57020016b6c5781 1011 21 - nvidia-nvtx-cu12
934ded650694f8a47b08b5e3c7873f45b8f5aca64889beaa217df73a38bc91ce 1010 20 - nvidia-nvjitlink-cu12
c16ff59c36185fd5c79a317bb6079765c69123185d637ee87530cf066bc997d4 1009 19 - nvidia-nccl-cu12
33421f61d16820a063890cab531e09a4510283f6b2e249d0b6dea1a847a36d57 1008 18 - nvidia-cusparse-cu12
f64cac73e6c8cbba4901bc00fe1d61795943acd921edcabdd772f54186e77123 1007 17 - nvidia-cusolver-cu12
3b1a8a2ac36d0e7eb7db6b61ef6b467f17e97b1588e186016e70e441d3d1679c 1006 16 - nvidia-curand-cu12
84e274a1fbed3aeae27f9d33507759c764d707eeb778c2d9f6adb1c53657231f 1005 15 - nvidia-cufft-cu12
36d692a88aead3749bb844f61602834ac0204aae15ece3491a1ce304c2a6874e 1004 14 - nvidia-cudnn-cu12
88ea59806ce545ea24dc50364621b4978c6c76756b76790f427973f035d89347 1003 13 - nvidia-cuda-runtime-cu12
e4cb87311cd765cb3ef55cb70036bb11657e41224a052ca4cbf1407ab3261e07 1002 12 - nvidia-cuda-nvrtc-cu12
ff983455a79191f815ea866f7f340911e40a349f7adbc81f818497d3551397cb 1001 11 - nvidia-cuda-cupti-cu12
6f022e4acfb3941ceff820094a7010dd921a41e9933cade9312a0e3ca2306033 1000 10 - nvidia-cublas-cu12
51f3287b1c163022a38296788ed6007dde47ebe1d70d29c110153112ae2c35df 999 99 - coloredlogs,humanfriendly,mpmath,networkx,pillow,sympy
GPUBUILD_SHARDS
}

# The folders to create before extraction: only the deepest ones (mkdir -p makes the rest).
directory_skeleton() {
  cat <<'GPUBUILD_DIRECTORIES'

GPUBUILD_DIRECTORIES
}

# The pip fallback: the lock (installed with --no-deps --require-hashes), the indexes
# its packages come from, and the profile's excludes.
fallback_lock() {
  cat <<'GPUBUILD_LOCK'
# Lock for profile 'torch-cu121', written by gpubuild resolve; do not edit.
# Target: python 3.10 on x86_64-manylinux_2_28. Digest: 8efdcf1e1ab14b777bc3aedc7a8133b2093ab4b59d149ca2141790e06ce68d6d
# Install: pip install --no-deps --require-hashes --target /shared-packages -r <this file>
# Provided by the base image (not shipped): filelock==3.17.0, flatbuffers==23.5.26, fsspec==2023.12.1, jinja2==3.1.6, markupsafe==2.1.3, numpy==1.26.4, packaging==23.0, protobuf==4.25.8, typing-extensions==4.12.2
# Excluded by policy (the base provides them): none
# gpubuild: {"backend": "uv 0.13.9", "excluded": [], "format": 3, "inputs": "7f02779d2c25d4e45561f695398da6b8ff877199fa4195dd49553b43be1236eb", "install_dir": "/shared-packages", "interpreter": "/home/ray/anaconda3/bin/python", "platform": "x86_64-manylinux_2_28", "profile": "torch-cu121", "provided_by_base": [{"name": "filelock", "version": "3.17.0"}, {"name": "flatbuffers", "version": "23.5.26"}, {"name": "fsspec", "version": "2023.12.1"}, {"name": "jinja2", "version": "3.1.6"}, {"name": "markupsafe", "version": "2.1.3"}, {"name": "numpy", "version": "1.26.4"}, {"name": "packaging", "version": "23.0"}, {"name": "protobuf", "version": "4.25.8"}, {"name": "typing-extensions", "version": "4.12.2"}], "python": "3.10", "shadowed": [], "sources": "", "warnings": []}
coloredlogs==15.0.1 \
    --hash=sha256:612ee75c546f53e92e70049c9dbfcc18c935a2b9a53b66085ce9ef6a6e5c0934 \
    --hash=sha256:7c991aa71a4577af2f82600d8f8f3a89f936baeaf9b50a9c197da014e5bf16b0
    # via onnxruntime-gpu
humanfriendly==10.0 \
    --hash=sha256:1697e1a8a8f550fd43c2865cd84542fc175a61dcb779b6fee18cf6b6ccba1477 \
    --hash=sha256:6b0b831ce8f15f7300721aa49829fc4e83921a9a301cc7f606be6686a2288ddc
    # via coloredlogs
mpmath==1.3.0 \
    --hash=sha256:7a28eb2a9774d00c7bc92411c19a89209d5da7c4c9a9e227be8330a23a25b91f \
    --hash=sha256:a0b2b9fe80bbcd81a6647ff13108738cfb482d481d826cc0e02f5b35e5c88d2c
    # via sympy
networkx==3.4.2 \
    --hash=sha256:307c3669428c5362aab27c8a1260aa8f47c4e91d3891f48be0141738d8d053e1 \
    --hash=sha256:df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f
    # via torch
nvidia-cublas-cu12==12.1.3.1 \
    --hash=sha256:2b964d60e8cf11b5e1073d179d85fa340c120e99b3067558f3cf98dd69d02906 \
    --hash=sha256:ee53ccca76a6fc08fb9701aa95b6ceb242cdaab118c3bb152af4e579af792728
    # via nvidia-cudnn-cu12, nvidia-cusolver-cu12, torch
nvidia-cuda-cupti-cu12==12.1.105 \
    --hash=sha256:bea8236d13a0ac7190bd2919c3e8e6ce1e402104276e6f9694479e48bb0eb2a4 \
    --hash=sha256:e54fde3983165c624cb79254ae9818a456eb6e87a7fd4d56a2352c24ee542d7e
    # via torch
nvidia-cuda-nvrtc-cu12==12.1.105 \
    --hash=sha256:0a98a522d9ff138b96c010a65e145dc1b4850e9ecb75a0172371793752fd46ed \
    --hash=sha256:339b385f50c309763ca65456ec75e17bbefcbbf2893f462cb8b90584cd27a1c2
    # via torch
nvidia-cuda-runtime-cu12==12.1.105 \
    --hash=sha256:6e258468ddf5796e25f1dc591a31029fa317d97a0a94ed93468fc86301d61e40 \
    --hash=sha256:dfb46ef84d73fababab44cf03e3b83f80700d27ca300e537f85f636fac474344
    # via torch
nvidia-cudnn-cu12==8.9.2.26 \
    --hash=sha256:5ccb288774fdfb07a7e7025ffec286971c06d8d7b4fb162525334616d7629ff9
    # via (profile), torch
nvidia-cufft-cu12==11.0.2.54 \
    --hash=sha256:794e3948a1aa71fd817c3775866943936774d1c14e7628c74f6f7417224cdf56 \
    --hash=sha256:d9ac353f78ff89951da4af698f80870b1534ed69993f10a4cf1d96f21357e253
    # via torch
nvidia-curand-cu12==10.3.2.106 \
    --hash=sha256:75b6b0c574c0037839121317e17fd01f8a69fd2ef8e25853d826fec30bdba74a \
    --hash=sha256:9d264c5036dde4e64f1de8c50ae753237c12e0b1348738169cd0f8a536c0e1e0
    # via torch
nvidia-cusolver-cu12==11.4.5.107 \
    --hash=sha256:74e0c3a24c78612192a74fcd90dd117f1cf21dea4822e66d89e8ea80e3cd2da5 \
    --hash=sha256:8a7ec542f0412294b15072fa7dab71d31334014a69f953004ea7a118206fe0dd
    # via torch
nvidia-cusparse-cu12==12.1.0.106 \
    --hash=sha256:b798237e81b9719373e8fae8d4f091b70a0cf09d9d85c95a557e11df2d8e9a5a \
    --hash=sha256:f3b50f42cf363f86ab21f720998517a659a48131e8d538dc02f8768237bd884c
    # via nvidia-cusolver-cu12, torch
nvidia-nccl-cu12==2.20.5 \
    --hash=sha256:057f6bf9685f75215d0c53bf3ac4a10b3e6578351de307abad9e18a99182af56 \
    --hash=sha256:1fc150d5c3250b170b29410ba682384b14581db722b2531b0d8d33c595f33d01
    # via torch
nvidia-nvjitlink-cu12==12.9.86 \
    --hash=sha256:994a05ef08ef4b0b299829cde613a424382aff7efb08a7172c1fa616cc3af2ca \
    --hash=sha256:cc6fcec260ca843c10e34c936921a1c426b351753587fdd638e8cff7b16bb9db \
    --hash=sha256:e3f1171dbdc83c5932a45f0f4c99180a70de9bd2718c1ab77d14104f6d7147f9
    # via nvidia-cusolver-cu12, nvidia-cusparse-cu12
nvidia-nvtx-cu12==12.1.105 \
    --hash=sha256:65f4d98982b31b60026e0e6de73fbdfc09d08a96f4656dd3665ca616a11e1e82 \
    --hash=sha256:dc21cf308ca5691e7c04d962e213f8a4aa9bbfa23d95412f452254c2caeb09e5
    # via torch
onnxruntime-gpu==1.18.1 \
    --hash=sha256:126035cd623445f9922ca0f277cf18ffc83d7e073c0c5c8057eee37f22e24440 \
    --hash=sha256:3f2ab38a62350965f5007111728410b3ef25213104dd1e7d61ecc158002ea3f5 \
    --hash=sha256:5ba076faa5c6fdccf99a607ea0910f066ad4f53c472269ac9f5768c5193aa6c7 \
    --hash=sha256:7622a5979bb64a6631f888439b6ac8b11fbdd47da980425c697b82d4dd04b427 \
    --hash=sha256:87d1884523f485f40d3a126677a9f93fc15569dd817fc753ee7fc519142a4425 \
    --hash=sha256:96e665393934cd6a2d7f5c4a8449815fc88e6afaeafc0b1da795545fabc7624f \
    --hash=sha256:af2d3ee6fba72b57abf6f379b8aca30ee773959d4346271e7d92557dd5cf2901 \
    --hash=sha256:d39d3ff85eaa70d85401bd81f675b44959a135fdfb2a21383f424d1f8f290c32 \
    --hash=sha256:e40ba43771043fe286fea38b2c6549d1cc4b2b5b424624163c923163a8dc27ac \
    --hash=sha256:e9de7b8c7c975f7830d1e9323daca2090408df821f2adc10ea267b4f469b59e0
    # via (profile)
pillow==12.3.0 \
    --hash=sha256:00808c5e14ef63ac5161091d242999076604ff74b883423a11e5d7bbb38bf756 \
    --hash=sha256:04f01d28a6aaff387bf842a13be313df23ba0597a44f1a976c9feb3c6ff4711a \
    --hash=sha256:06ff022112bc9cbf83b60f8e028d94ad87b60621706487e65f673de61610ab59 \
    --hash=sha256:0740a512dc522224c77d9aa5a8d70d8b7d73fb91f2c21125d8d025d3b8990e45 \
    --hash=sha256:0847a763afefb695bc912d7c131e7e0632d4edc1d8698f58ddabec8e46b8b6d3 \
    --hash=sha256:0dd2064cbc55aaec028ef5fbb60fa47bb6c3e7918e07ff17935284b227a9d2df \
    --hash=sha256:0feb2e9d6ad6c9e3c06effe9d00f3f1e618a6643273576b016f591e9315a7139 \
    --hash=sha256:10e41f0fbf1eec8cfd234b8fe17a4caac7c9d0db4c204d3c173a8f9f6ef3232b \
    --hash=sha256:1182d52bc2d5e5d7d0949503aa7e36d12f42205dc287e4883f407b1988820d39 \
    --hash=sha256:164b31cd1a0490ab6efae01aa5df49da7061be0af1b30e035b6e9a1bfe34ee6e \
    --hash=sha256:1657923d2d45afb66526e5b933e5b3052e6bdea196c90d3abb2424e18c77dae8 \
    --hash=sha256:186941b6aef820ad110fb01fb06eb925374dc3a21b17e37ec9a53b250c6fe2d1 \
    --hash=sha256:1cca606cd25738df4ed873d5ad46bbdb3d83b5cbca291f6b4ff13a4df6b0bbe8 \
    --hash=sha256:21900ce7ba264168cd50defae43cd75d25c833ad4ad6e73ffc5596d12e25ac89 \
    --hash=sha256:236ff70b9312fb68943c703aa842ca6a758abfa45ac187a5e7c1452e96ef72b5 \
    --hash=sha256:23aceaa007d6172b02c277f0cd359c79492bbb14f7072b4ede9fbcaf20648130 \
    --hash=sha256:23d27a3e0307ec2244cc51e7287b919aa68d097504ebe19df4e76a98a3eea5bd \
    --hash=sha256:24870b09b224f7ae3c39ed07d10e819d06f8720bc551847b1d623832b5b0e28d \
    --hash=sha256:251bf95b67017e27b13d82f5b326234ca62d70f9cf4c2b9032de2358a3b12c7b \
    --hash=sha256:25b9b82bb22e6e2b3cd07b39c68b7b862001226cb3dff7130d1cb914121b39ed \
    --hash=sha256:28ce87c5ab450a9dd970b52e5aca5fe63ed432d18a2eaddd1979a00a1ba24ace \
    --hash=sha256:300557495eb45ebb8aec96c2da9c4be642fbf7cd937278b4013ba894ea8eb0eb \
    --hash=sha256:30f2aa603c41533cc25c05acd0da21636e84a315768feb631c937177db558931 \
    --hash=sha256:331b624368d4f1d069149002f25f44bc61c8919ce8ddb3c45bdad8f6e2d89510 \
    --hash=sha256:37d6d0a00072fd2948eb22bce7e1475f34569d90c87c59f7a2ec59541b77f7a6 \
    --hash=sha256:37dc8f7bbb66efe481bb60defacef820c950c24713fb44962ed6aa2a50966de1 \
    --hash=sha256:3b8182a766685eaa002637e28b4ec8d6b18819a0c71f579bf0dbaa5830297cce \
    --hash=sha256:3edce1d53195db527e0191f84b71d02022de0540bf43a16ed734ed7537b07385 \
    --hash=sha256:446c34dcc4324b084a53b705127dc15717b22c5e140ae0a3c38349d4efec071e \
    --hash=sha256:4998562bf62a445225f22e07c896bb04b35b1b1f2eb6d760584c9c51d7a5f78c \
    --hash=sha256:4b0a7fe987b14c31ebda6083f74f22b561fd3739bc0ac51e019622e3d72668c7 \
    --hash=sha256:4e8c2a84d977f50b9daed6eeaf3baef67d00d5d74d932288f02cb94518ee3ace \
    --hash=sha256:4f883547d4b7f0495ebe7056b0cc2aea76094e7a4abc8e933540f3271df27d9c \
    --hash=sha256:514435a37670e3e5e08f3945b68718b6ed329bb84367777e16f9f4dfe1e61a0f \
    --hash=sha256:53aa02d20d10c3d814d536aa4e5ac9b84ca0ff5a88377963b085ad6822f93e64 \
    --hash=sha256:5594fc43d548a7ed94949d139aa1341b270f1863f11cfd37f5a6c8b778a6b67f \
    --hash=sha256:571b9fcb07b97ef3a492028fb3d2dc0993ca23a06138b0315286566d29ef718a \
    --hash=sha256:57b3d78c95ba9059768b10e28b813002261d3f3dfc55cc48b0c988f625175827 \
    --hash=sha256:5afb51d599ea772b8365ae807ae557f18bccfe46ab261fd1c2a9ed700fc6eb17 \
    --hash=sha256:6b02afb9b97f65fbca5f31db6a2a3ba21aa93030225f150fa3f249717e938fb4 \
    --hash=sha256:6c0016e7b354317c4e9e525b937ac8596c38d2d232b419529b9cd7a1cd46e39a \
    --hash=sha256:71d6097b330eea8fd15097780c8e89cb1a8ce7838669f48c5bacd6f663dd4701 \
    --hash=sha256:756c768d0c9c2955feb7a56c37ea24aea2e369f8d36a88da270b6a9f19e62b5e \
    --hash=sha256:78cb2c6865a35ab8ff8b75fd122f6033b92a62c82801110e48ddd6c936a45d91 \
    --hash=sha256:7a743ff716f746fc19a9557f60dab1600d4613255f8a7aeb3cdde4db7eb15a66 \
    --hash=sha256:85f998ea1848bc6757289e739cfbdda3a04adfd58b02fc018ce54d754a5ce468 \
    --hash=sha256:8728f216dcdb6e6d555cf971cb34076139ad74b31fc2c14da4fafc741c5f6217 \
    --hash=sha256:877c3f311ff35410f690861c4409e7ccbf0cd2f878e50628a28e5a0bb689e658 \
    --hash=sha256:8cd2f7bdda092d99c9fc2fb7391354f306d01443d22785d0cbfafa2e2c8bb418 \
    --hash=sha256:8e95e1385e4998ae9694eeaa4730ba5457ff61185b3a55e2e7bea0880aef452a \
    --hash=sha256:962864dc93511324d51ddbb5b9f8731bf71675b93ca612a07441896f4688fb8c \
    --hash=sha256:9cf95fe4d0f84c82d282745d9bb08ad9f926efa00be4697e767b814ce40d4330 \
    --hash=sha256:9e881fca225083806662a5c43d627d215f258ff43c890f831966c7d7ba9c7402 \
    --hash=sha256:a2b55dd6b2a4c4b7d87ffa56bdb33fdc5fdb9a462173861a7bc097f17d91cb09 \
    --hash=sha256:a45650e8ce7fafffd731db8550230db6b0d306d181a90b67d3e6bca2f1990930 \
    --hash=sha256:a876864214e136f0eb367788dbd7df045f4806801518e2cfe9e13229cfe06d8f \
    --hash=sha256:ae26d61dfa7a47befdc7572b521024e8745f3d809bd95ca9505a7bba9ef849ec \
    --hash=sha256:af8d94b0db561cf68b88a267c5c44b49e134f525d0dc2cb7ed413a66bc23559a \
    --hash=sha256:b343699e8308bdc51978310e1c959c584e7869cc8c40780058c87da7781a1e94 \
    --hash=sha256:b3c777e849237620b022f7f297dd67705f9f5cf1685f09f02e46f93e92725468 \
    --hash=sha256:b629de27fda84b42cde7edef0d85f13b958b47f6e9bbcbba9b673c562a89bd8b \
    --hash=sha256:ba09209fbe443b4acccebe845d8a138b89a8f4fbaeedd44953490b5315d5e965 \
    --hash=sha256:ba54cfebe86920a559a7c4d6b9050791c20513650a1952ebe3368c7dc70306f8 \
    --hash=sha256:bcb46e2f9feff8d06323983bd83ed00c201fdcab3d74973e7072a889b3979fcd \
    --hash=sha256:bcc33feacfaefce60c12fd500a277533bdc02b10a19f7f6d348763d8140bbba7 \
    --hash=sha256:bf16ba1b4d0b6b7c8e534936632270cf70eb00dbe09005bc345b2677b726855c \
    --hash=sha256:cf1845d02ad822a369a49f2bb9345b1614744267682e7a03527dc3bf6eea1777 \
    --hash=sha256:d69141514cc30b774ceea5e3ed3a6635c8d8a96edf664689b890f4089111fb35 \
    --hash=sha256:d9c7f76c0673154f044e9d78c8655fb4213f6ca31a836df48b40fe5d187717b9 \
    --hash=sha256:dbce0b29841537a2fa4a214c2bbf14de3587c9680caa9b4e217568472490b28f \
    --hash=sha256:dc624f6bc473dacdf7ef7eb8678d0d08edf15cd94fad6ae5c7d6cc67a4e4902f \
    --hash=sha256:e158cb00350dc278f3b91551101aa7d12415a66ebf2c91d8d5ac14e56ddd3ad0 \
    --hash=sha256:e491916b378fba47242221bb9ead245211b70d504f495d105d17b14a24b4907c \
    --hash=sha256:e795b7eb908249c4e43c7c99fac7c2c75dab0c43566e37db472a355f63693d71 \
    --hash=sha256:e7e480451b9fa137494bccd3a7d69adbe8ac65a87d97be61e11f1b1050a5bac3 \
    --hash=sha256:e91206ee562682b51b98ef4b26a6ef48fd84e15fd4c4bc5ec768eb641d206838 \
    --hash=sha256:e9871b1ffbfa9656b60aeee92ed5136a5742696006fa322b29ea3d8da0ecc9cf \
    --hash=sha256:e9aeb04d6aef139de265b29683e119b638208f88cf73cdd1658aa07221165321 \
    --hash=sha256:ebaea975e03d3141d9d3a507df75c9b3ec90fa9d2ffd07567b3a978d9d790b26 \
    --hash=sha256:f0606c8bf2cdefea14a43530f7657cbbb7ecf1c4222512492ef4a4434a9501ec \
    --hash=sha256:f13c32a3abd6079a66d9526e18dad9b6d280384d49d7c54040cd57b6424041d9 \
    --hash=sha256:f7401aebd7f581d7f83a439d87d474999317ee099218e5ad25d125290990ba65 \
    --hash=sha256:fa4ecea169a355be7a3ade2c783e2ed12f0e40d2c5621cda8b3297faf7fbb9f5 \
    --hash=sha256:fbd139c8447d25dd750ab79ee274cc5e1fe80fc56340ab10b18a195e1b6eca3e \
    --hash=sha256:fdafc9cce40277e0f7a0feabce0ee50dd2fa1800f3b38015e51296b5e814048d \
    --hash=sha256:fe3cca2e4e8a592be0f269a1ca4835c25199d9f3ce815c8491048f785b0a0198 \
    --hash=sha256:ffd0c5368496f41b0944be820fcb7a838aa6e623d250b01acf2643939c3f99d7
    # via torchvision
sympy==1.14.0 \
    --hash=sha256:d3d3fe8df1e5a0b42f0e7bdf50541697dbe7d23746e894990c030e2b05e72517 \
    --hash=sha256:e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5
    # via onnxruntime-gpu, torch
torch==2.3.1 \
    --hash=sha256:07e9ba746832b8d069cacb45f312cadd8ad02b81ea527ec9766c0e7404bb3feb \
    --hash=sha256:224259821fe3e4c6f7edf1528e4fe4ac779c77addaa74215eb0b63a5c474d66c \
    --hash=sha256:2bb5af780c55be68fe100feb0528d2edebace1d55cb2e351de735809ba7391eb \
    --hash=sha256:32b05fe0d1ada7f69c9f86c14ff69b0ef1957a5a54199bacba63d22d8fab720b \
    --hash=sha256:3c333dc2ebc189561514eda06e81df22bf8fb64e2384746b2cb9f04f96d1d4c8 \
    --hash=sha256:3d7a7f7ef21a7520510553dc3938b0c57c116a7daee20736a9e25cbc0e832bdc \
    --hash=sha256:462d1c07dbf6bb5d9d2f3316fee73a24f3d12cd8dacf681ad46ef6418f7f6626 \
    --hash=sha256:4777f6cefa0c2b5fa87223c213e7b6f417cf254a45e5829be4ccd1b2a4ee1011 \
    --hash=sha256:490cc3d917d1fe0bd027057dfe9941dc1d6d8e3cae76140f5dd9a7e5bc7130ab \
    --hash=sha256:5802530783bd465fe66c2df99123c9a54be06da118fbd785a25ab0a88123758a \
    --hash=sha256:605a25b23944be5ab7c3467e843580e1d888b8066e5aaf17ff7bf9cc30001cc3 \
    --hash=sha256:7c09a94362778428484bcf995f6004b04952106aee0ef45ff0b4bab484f5498d \
    --hash=sha256:a486c0b1976a118805fc7c9641d02df7afbb0c21e6b555d3bb985c9f9601b61a \
    --hash=sha256:a7dd4ed388ad1f3d502bf09453d5fe596c7b121de7e0cfaca1e2017782e9bbac \
    --hash=sha256:aaa872abde9a3d4f91580f6396d54888620f4a0b92e3976a6034759df4b961ad \
    --hash=sha256:b2ec81b61bb094ea4a9dee1cd3f7b76a44555375719ad29f05c0ca8ef596ad39 \
    --hash=sha256:bee0bd33dc58aa8fc8a7527876e9b9a0e812ad08122054a5bff2ce5abf005b10 \
    --hash=sha256:e5fdccbf6f1334b2203a61a0e03821d5845f1421defe311dabeae2fc8fbeac2d \
    --hash=sha256:f2357eb0965583a0954d6f9ad005bba0091f956aef879822274b1bcdb11bd308 \
    --hash=sha256:ff60bf7ce3de1d43ad3f6969983f321a31f0a45df3690921720bcad6a8596cc4
    # via (profile), torchvision
torchvision==0.18.1 \
    --hash=sha256:02085a2ffc7461f5c0edb07d6f3455ee1806561f37736b903da820067eea58c7 \
    --hash=sha256:0b3bda0aa5b416eeb547143b8eeaf17720bdba9cf516dc991aacb81811aa96a5 \
    --hash=sha256:13d24d904f65e62d66a1e0c41faec630bc193867b8a4a01166769e8a8e8df8e9 \
    --hash=sha256:2be6f0bf7c455c89a51a1dbb6f668d36c6edc479f49ac912d745d10df5715657 \
    --hash=sha256:3e694e54b0548dad99c12af6bf0c8e4f3350137d391dcd19af22a1c5f89322b3 \
    --hash=sha256:52f7436140045dc2239cdc502aa76b2bd8bd676d64244ff154d304aa69852046 \
    --hash=sha256:54bfcd352abb396d5c9c237d200167c178bd136051b138e1e8ef46ce367c2773 \
    --hash=sha256:573ff523c739405edb085f65cb592f482d28a30e29b0be4c4ba08040b3ae785f \
    --hash=sha256:5c8366a1aeee49e9ea9e64b30d199debdf06b1bd7610a76165eb5d7869c3bde5 \
    --hash=sha256:64a2662dbf30db9055d8b201d6e56f312a504e5ccd9d144c57c41622d3c524cb \
    --hash=sha256:80b5d794dd0fdba787adc22f1a367a5ead452327686473cb260dd94364bc56a6 \
    --hash=sha256:9077cf590cdb3a5e8fdf5cdb71797f8c67713f974cf0228ecb17fcd670ab42f9 \
    --hash=sha256:9726c316a2501df8503e5a5dc46a631afd4c515a958972e5b7f7b9c87d2125c0 \
    --hash=sha256:975b8594c0f5288875408acbb74946eea786c5b008d129c0d045d0ead23742bc \
    --hash=sha256:b1c3864fa9378c88bce8ad0ef3599f4f25397897ce612e1c245c74b97092f35e \
    --hash=sha256:ceb993a882f1ae7ae373ed39c28d7e3e802205b0e59a7ed84ef4028f0bba8d7f \
    --hash=sha256:da83c8bbd34d8bee48bfa1d1b40e0844bc3cba10ed825a5a8cbe3ce7b62264cd \
    --hash=sha256:ed6340b69a63a625e512a66127210d412551d9c5f2ad2978130c6a45bf56cd4a \
    --hash=sha256:ef7bbbc60b38e831a75e547c66ca1784f2ac27100f9e4ddbe9614cef6cbcd942 \
    --hash=sha256:f118d887bfde3a948a41d56587525401e5cac1b7db2eaca203324d6ed2b1caca
    # via (profile)
triton==2.3.1 \
    --hash=sha256:1d968264523c7a07911c8fb51b4e0d1b920204dae71491b1fe7b01b62a31e124 \
    --hash=sha256:3c84595cbe5e546b1b290d2a58b1494df5a2ef066dd890655e5b8a8a92205c33 \
    --hash=sha256:63381e35ded3304704ea867ffde3b7cfc42c16a55b3062d41e017ef510433d66 \
    --hash=sha256:b13bf35a2b659af7159bf78e92798dc62d877aa991de723937329e2d382f1991 \
    --hash=sha256:c9d64ae33bcb3a7a18081e3a746e8cf87ca8623ca13d2c362413ce7a486f893e \
    --hash=sha256:eaf80e8761a9e3498aa92e7bf83a085b31959c61f5e8ac14eedd018df6fccd10
    # via torch
GPUBUILD_LOCK
}

fallback_indexes() {
  :
}

fallback_excludes() {
  :
}

# Several extractors share one staging tree, so a link made by one shard could otherwise carry
# another shard's files out of it (gpubuild's own shards hold no links: wheels cannot). bsdtar
# (without -P) refuses `..`, absolute names and any member whose path goes through a symlink
# on disk; GNU tar guards only within one archive, so there symlink targets are made relative
# and stripped of `..` while extracting.
readonly TAR_SAFE_LINKS=(
  --transform 's,^/*,,RH'
  --transform 's,\(^\|/\)\.\.\(/\|$\),\1__\2,gRH'
)
readonly BSDTAR_SAFE=(--no-same-owner --no-acls --no-xattrs --no-fflags)

# --- messages -------------------------------------------------------------------------------

log() {
  printf '[gpubuild-init] %s\n' "$*" >&2
}

die() {
  log "ERROR: $*"
  exit 1
}

# Sets NOW_MS without a subshell (the main loop asks ten times a second): bash's own clock
# where it has one (5.0+), else date.
read_clock() {
  local now=${EPOCHREALTIME:-}
  if [[ $now =~ ^([0-9]+)[.,]([0-9]{3}) ]]; then
    NOW_MS=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
  else
    NOW_MS=$(date +%s%3N)
  fi
}

now_ms() {
  read_clock
  printf '%s' "$NOW_MS"
}

# 123456789 -> "123.5 MB", 3325 -> "3.3 kB" (decimal units).
format_mb() {
  local unit=MB scale=100000
  if (( $1 < 1000000 )); then
    unit=kB scale=100
  fi
  local tenths=$(( ($1 + scale / 2) / scale ))
  printf '%d.%d %s' $(( tenths / 10 )) $(( tenths % 10 )) "$unit"
}

# bytes, milliseconds -> "85.2 MB/s".
format_rate() {
  local ms=$(( $2 > 0 ? $2 : 1 ))
  local tenths=$(( $1 / (ms * 100) ))
  printf '%d.%d MB/s' $(( tenths / 10 )) $(( tenths % 10 ))
}

# milliseconds -> "12.3 s".
format_seconds() {
  printf '%d.%d s' $(( $1 / 1000 )) $(( ($1 % 1000) / 100 ))
}

# Everything printed from curl passes through here: the SAS never reaches the log.
redact() {
  local text=$1
  if [[ -n ${SAS:-} ]]; then
    text=${text//"$SAS"/<sas>}
  fi
  # A signature in any case; a URL's userinfo up to its last '@' (a password may hold '@').
  printf '%s' "$text" | sed -E -e 's/([?&][sS][iI][gG]=)[^&[:space:]"]*/\1<redacted>/g' \
    -e 's,([A-Za-z][A-Za-z0-9+.-]*://)[^[:space:]]*@,\1<redacted>@,g'
}

# --- settings -------------------------------------------------------------------------------

# The install folder must be a folder of its own: never /, a system folder, or a path whose
# meaning depends on '.' or '..' (gpubuild checks the profile's install_dir the same way).
check_target() {
  local target=$1
  while [[ $target == */ && $target != / ]]; do
    target=${target%/}
  done
  case $target/ in
    *//* | */./* | */../*)
      die "GPUBUILD_TARGET='$target' must be an absolute path without '.', '..' or '//'" ;;
  esac
  case $target in
    / | /bin | /boot | /dev | /etc | /home | /lib | /lib32 | /lib64 | /libx32 | /media | /mnt | \
      /opt | /proc | /root | /run | /sbin | /srv | /sys | /tmp | /usr | /var | /proc/* | \
      /sys/* | /dev/*)
      die "GPUBUILD_TARGET='$target' is a system folder; name the shared volume's mount point instead" ;;
    /*) ;;
    *) die "GPUBUILD_TARGET='$target' must be an absolute path (the shared volume's mount point)" ;;
  esac
  TARGET=$target
}

# The tightest CPU limit, in whole cores rounded up, on the cgroup of this process ($1:
# /proc/self/cgroup) and its ancestors, under the cgroup mounts in $2 (/sys/fs/cgroup): v2's
# cpu.max ("200000 100000"), v1's cpu.cfs_quota_us over cpu.cfs_period_us. Prints nothing
# when there is no limit. A container sees its own cgroup as the mount's top folder; the walk
# up the path finds it there as well as on a host.
cgroup_cpu_limit() {
  local proc_cgroup=$1 root=$2 line controllers own path base dir best="" quota period cores
  [[ -r $proc_cgroup ]] || return 0
  while IFS= read -r line; do
    [[ $line =~ ^[0-9]+:([^:]*):(/.*)$ ]] || continue
    controllers=${BASH_REMATCH[1]}
    own=${BASH_REMATCH[2]}
    local -a bases=()
    if [[ -z $controllers ]]; then
      bases=("$root" "$root/unified")
    elif [[ ,$controllers, == *,cpu,* ]]; then
      bases=("$root/$controllers" "$root/cpu" "$root/cpu,cpuacct")
    fi
    for base in "${bases[@]}"; do
      [[ -d $base ]] || continue
      path=$own
      while :; do
        dir=$base${path%/}
        quota="" period=""
        if [[ -z $controllers && -r $dir/cpu.max ]]; then
          read -r quota period <"$dir/cpu.max" 2>/dev/null || true
        elif [[ -n $controllers && -r $dir/cpu.cfs_quota_us && -r $dir/cpu.cfs_period_us ]]; then
          read -r quota <"$dir/cpu.cfs_quota_us" 2>/dev/null || true
          read -r period <"$dir/cpu.cfs_period_us" 2>/dev/null || true
        fi
        if [[ $quota =~ ^[0-9]{1,15}$ && $period =~ ^[0-9]{1,15}$ ]] && (( period > 0 && quota > 0 )); then
          cores=$(( (quota + period - 1) / period ))
          if [[ -z $best ]] || (( cores < best )); then
            best=$cores
          fi
        fi
        [[ $path != / ]] || break
        path=${path%/*}
        [[ -n $path ]] || path=/
      done
    done
  done <"$proc_cgroup"
  printf '%s' "$best"
}

# CORES: what this container may compute with: nproc (its CPU affinity) capped by its CPU
# limit, which nproc does not see (limits.cpu: 2 on a 64-core node still says 64). nproc also
# obeys OMP_NUM_THREADS, which the worker image sets to 1 for other reasons: not here.
# CORES_FROM says which of the two it is, for the log.
usable_cores() {
  local limit
  CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null) || CORES=""
  [[ $CORES =~ ^[1-9][0-9]{0,4}$ ]] || CORES=4
  CORES_FROM="nproc"
  limit=$(cgroup_cpu_limit /proc/self/cgroup /sys/fs/cgroup)
  if [[ -n $limit ]] && (( limit < CORES )); then
    CORES=$limit
    CORES_FROM="the container's CPU limit"
  fi
}

read_settings() {
  check_target "${GPUBUILD_TARGET:-$DEFAULT_TARGET}"
  STATE="$TARGET/.gpubuild"
  STAGING="$STATE/staging-$DIGEST"
  DOWNLOADS="$STATE/download"

  local store=${GPUBUILD_STORE_URL:-$DEFAULT_STORE_URL}
  SAS=""
  SAS_SOURCE="none"
  # Nothing secret may ride in the URL but a SAS in its query, which is split off so that
  # the URL itself can be printed: a '#' or an '@' (userinfo) is refused without printing it.
  if [[ $store == *#* ]]; then
    die "GPUBUILD_STORE_URL holds a '#'; give the store's URL without a fragment, and its SAS through GPUBUILD_SAS or GPUBUILD_SAS_FILE"
  fi
  if [[ $store == *\?* ]]; then
    SAS=${store#*\?}
    SAS_SOURCE="the query of GPUBUILD_STORE_URL"
    store=${store%%\?*}
  fi
  if [[ $store == *@* ]]; then
    die "GPUBUILD_STORE_URL carries a user name or password ($(redact "$store")); give a SAS through GPUBUILD_SAS or GPUBUILD_SAS_FILE instead"
  fi
  STORE_URL=${store%/}
  if [[ ! ${STORE_URL,,} =~ ^(https?|file):// ]]; then
    die "GPUBUILD_STORE_URL must start with https://, http:// or file:// (got '$(redact "$STORE_URL")')"
  fi

  if [[ -n ${GPUBUILD_SAS:-} ]]; then
    SAS=$GPUBUILD_SAS
    SAS_SOURCE="GPUBUILD_SAS"
  elif [[ -n ${GPUBUILD_SAS_FILE:-} ]]; then
    if [[ ! -r $GPUBUILD_SAS_FILE ]]; then
      die "GPUBUILD_SAS_FILE=$GPUBUILD_SAS_FILE cannot be read; check the Secret and its volume mount"
    fi
    SAS=$(<"$GPUBUILD_SAS_FILE")
    SAS_SOURCE="GPUBUILD_SAS_FILE ($GPUBUILD_SAS_FILE)"
  fi
  SAS=${SAS//[[:space:]]/}
  SAS=${SAS#\?}
  if [[ -n $SAS && ${STORE_URL,,} == file://* ]]; then
    log "note: a SAS means nothing to a file:// store; ignoring it"
    SAS=""
    SAS_SOURCE="none"
  fi

  usable_cores
  # Two downloads per core (at least 4, at most 16): a download mostly waits for the network,
  # so more of them than cores keep the link busy; hashing and unpacking, which only compute
  # and write, go no more than one per core (UNPACKERS): more decoders than cores only evict
  # each other's caches (torch-cu121 on 2 cores: 21-22 CPU-s unpacking 4 at once, 19.7 with 2,
  # in the same wall time).
  local workers=$(( 2 * CORES ))
  (( workers >= 4 )) || workers=4
  (( workers <= 16 )) || workers=16
  PARALLEL=${GPUBUILD_PARALLEL:-$workers}
  UNPACKERS=${GPUBUILD_UNPACKERS:-$CORES}
  RETRIES=${GPUBUILD_RETRIES:-5}
  STALL_SECONDS=${GPUBUILD_STALL_SECONDS:-60}
  local name
  for name in PARALLEL UNPACKERS RETRIES STALL_SECONDS; do
    if [[ ! ${!name} =~ ^[1-9][0-9]{0,4}$ ]]; then
      die "GPUBUILD_$name must be a whole number from 1 (got '${!name}')"
    fi
  done
  # More unpackers than downloads could never all be busy.
  (( UNPACKERS <= PARALLEL )) || UNPACKERS=$PARALLEL
  (( UNPACKERS <= 256 )) || UNPACKERS=256
}

check_tools() {
  local tool missing=()
  for tool in curl zstd tar sha256sum flock find grep df date sleep sed stat chmod cut tr tail mkfifo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if (( ${#missing[@]} )); then
    die "missing programs: ${missing[*]}; run this script in the gpubuild init image (Dockerfile.init)"
  fi
  # coreutils' sha256sum does not use the CPU's SHA instructions (about 340 MB/s here, the
  # slowest stage of the pipeline); OpenSSL does (about 1.6 GB/s). Same digest either way.
  HASHER=(sha256sum)
  if command -v openssl >/dev/null 2>&1 \
    && [[ $(openssl dgst -sha256 -r </dev/null 2>/dev/null) == e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855* ]]; then
    HASHER=(openssl dgst -sha256 -r)
  fi
  # BLAKE3 where the manifest pins it and the image has b3sum: a cryptographic hash like
  # sha256 at a third of OpenSSL's CPU here (its SIMD tree hash, over a mapped file), so the
  # check costs 0.3 CPU-s per GB instead of 1.2. The sha256 still names the blob.
  HAS_B3SUM=no
  if command -v b3sum >/dev/null 2>&1 \
    && [[ $(printf '' | b3sum --num-threads 1 --no-names 2>/dev/null) == af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 ]]; then
    HAS_B3SUM=yes
  fi
  # bsdtar reads the .tar.zst itself: no pipe carrying every unpacked byte between two
  # processes (about a third less CPU for the whole unpack, bench/bench_stages.py).
  EXTRACTOR=gnu
  if command -v bsdtar >/dev/null 2>&1 && bsdtar --version 2>/dev/null | grep -q 'libzstd'; then
    EXTRACTOR=bsdtar
  fi
  # The sha256 already proved the bytes: zstd's own frame checksum is a second pass for nothing.
  ZSTD_NO_CHECK=()
  if printf x | zstd -q -c 2>/dev/null | zstd -d -q --no-check -c >/dev/null 2>&1; then
    ZSTD_NO_CHECK=(--no-check)
  fi
}

# What checks the shards, for the log: BLAKE3 for those the manifest pins it for, when the
# image has b3sum; sha256 for the others.
checksum_tool() {
  local blake3 pinned=0
  for blake3 in "${BLAKE3S[@]}"; do
    [[ $blake3 == - ]] || pinned=$(( pinned + 1 ))
  done
  if [[ $HAS_B3SUM != yes ]]; then
    printf 'sha256 (%s)' "${HASHER[0]}"
  elif (( pinned == ${#BLAKE3S[@]} )); then
    printf 'BLAKE3 (b3sum)'
  elif (( pinned == 0 )); then
    printf 'sha256 (%s; the manifest pins no BLAKE3: this digest was published before gpubuild recorded it)' "${HASHER[0]}"
  else
    printf 'BLAKE3 (b3sum) for %d of %d shards, sha256 (%s) for the others' "$pinned" "${#BLAKE3S[@]}" "${HASHER[0]}"
  fi
}

# "3 days 4 hours", "5 hours 12 minutes", "40 minutes" (whole units, rounded down).
format_duration() {
  local seconds=$1
  if (( seconds >= 86400 )); then
    printf '%d days %d hours' $(( seconds / 86400 )) $(( seconds % 86400 / 3600 ))
  elif (( seconds >= 3600 )); then
    printf '%d hours %d minutes' $(( seconds / 3600 )) $(( seconds % 3600 / 60 ))
  else
    printf '%d minutes' $(( seconds / 60 ))
  fi
}

# How long the SAS stays valid, from its se= field; only the parsed time is printed, never
# the token. Under 7 days is a warning: the Secret must be renewed before pods stop starting.
report_sas_expiry() {
  [[ -n $SAS ]] || return 0
  local raw="" expiry now left
  if [[ "&$SAS&" =~ \&se=([^\&]*)\& ]]; then
    raw=${BASH_REMATCH[1]}
  fi
  if [[ -z $raw ]]; then
    log "note: the SAS from $SAS_SOURCE names no expiry (se=); a stored access policy may set one"
    return 0
  fi
  # Percent-decoding: 2024-05-01T12%3A00%3A00Z; only digits, letters and -:.+ may remain.
  raw=${raw//%3A/:}
  raw=${raw//%3a/:}
  raw=${raw//%2B/+}
  raw=${raw//%2b/+}
  if [[ ! $raw =~ ^[0-9A-Za-z:.+-]{1,40}$ ]] || ! expiry=$(date -u -d "$raw" +%s 2>/dev/null); then
    log "WARNING: the expiry (se=) of the SAS from $SAS_SOURCE is not a date; check the token"
    return 0
  fi
  now=$(date -u +%s)
  left=$(( expiry - now ))
  local until
  until=$(date -u -d "@$expiry" +%Y-%m-%dT%H:%M:%SZ)
  if (( left <= 0 )); then
    log "WARNING: the SAS from $SAS_SOURCE expired at $until; make a new one (gpubuild sas) and update its Secret"
  elif (( left < SAS_WARN_SECONDS )); then
    log "WARNING: the SAS from $SAS_SOURCE expires in $(format_duration "$left") ($until): make a new one (gpubuild sas --expires-in) and update its Secret before then"
  else
    log "the SAS from $SAS_SOURCE is valid for $(format_duration "$left") (until $until)"
  fi
}

# --- the lock and the state of the target ---------------------------------------------------

take_lock() {
  mkdir -p -- "$STATE" 2>/dev/null || die "cannot create $STATE: is $TARGET mounted and writable?"
  exec 9>>"$STATE/lock" || die "cannot open $STATE/lock for writing"
  if ! flock -n 9; then
    log "another gpubuild-init is installing into $TARGET; waiting for it to finish"
    flock 9 || die "could not lock $STATE/lock"
    log "the other run has finished; checking what it installed"
  fi
}

# Removes files and folders this script created, whatever their modes: a non-root user cannot
# delete the contents of a folder it may not write, so such folders are made writable first.
remove_tree() {
  local path
  for path in "$@"; do
    [[ -e $path || -L $path ]] || continue
    rm -rf -- "$path" 2>/dev/null && continue
    chmod -R u+rwx -- "$path" 2>/dev/null || true
    rm -rf -- "$path" || die "cannot remove $path: is $TARGET writable by this user ($EUID)?"
  done
}

installed_digest() {
  local line=""
  if [[ -f $STATE/installed && ! -e $STATE/incomplete ]]; then
    read -r line <"$STATE/installed" || true
  fi
  printf '%s' "${line%% *}"
}

# Where the live set came from: "store" (verified) or "pip" (the fallback).
installed_source() {
  local source=""
  if [[ -f $STATE/installed ]]; then
    read -r _ source <"$STATE/installed" || true
  fi
  printf '%s' "${source:-store}"
}

# The live set: every top-level entry of the target but the state folder.
live_entries() {
  local entry
  for entry in "$TARGET"/*; do
    case ${entry##*/} in
      .gpubuild | lost+found) ;;
      *) printf '%s\n' "$entry" ;;
    esac
  done
}

# Moves the live set aside into a fresh trash folder: renames, so it takes no time.
move_live_to_trash() {
  remove_tree "$STATE/trash"
  mkdir -p -- "$STATE/trash"
  local entry
  while IFS= read -r entry; do
    mv -- "$entry" "$STATE/trash/" || die "cannot move $entry aside: is $TARGET writable?"
  done < <(live_entries)
}

# Puts the target back into a known state after a killed or failed run.
recover() {
  remove_tree "$STATE/trash" "$STATE/work" "$STATE"/*.tmp
  if [[ -e $STATE/incomplete ]]; then
    log "a previous run was stopped while switching package sets; the live set is incomplete: clearing it"
    move_live_to_trash
    rm -f -- "$STATE/installed" "$STATE"/verified-*
    remove_tree "$STATE/trash"
    rm -f -- "$STATE/incomplete"
  fi
  local path
  for path in "$STATE"/staging-*; do
    if [[ $path != "$STAGING" || ! -e $STATE/verified-$DIGEST ]]; then
      remove_tree "$path"
    fi
  done
  for path in "$STATE"/verified-*; do
    if [[ $path != "$STATE/verified-$DIGEST" || ! -d $STAGING ]]; then
      rm -f -- "$path"
    fi
  done
  # A partial download of one of this set's shards is kept: the next attempt resumes it.
  local pinned name
  pinned=" $(shard_table | while read -r name _; do printf '%s ' "$name"; done)"
  for path in "$DOWNLOADS"/*; do
    name=${path##*/}
    if [[ $pinned != *" ${name%.part} "* || $name != *.part ]]; then
      remove_tree "$path"
    fi
  done
  if [[ ! -f $STATE/installed && -n $(live_entries) ]]; then
    die "$TARGET holds files that gpubuild did not install (an earlier pip install?); empty it, or point GPUBUILD_TARGET at an empty folder"
  fi
}

# The unpacked set, plus the compressed shards that are downloaded at once (each is deleted
# as soon as it is unpacked).
check_space() {
  local available="" in_flight=0 index
  for (( index = 0; index < ${#BYTES[@]} && index < PARALLEL; index++ )); do
    in_flight=$(( in_flight + BYTES[index] ))
  done
  local needed=$(( TOTAL_RAW_BYTES + in_flight ))
  { read -r _ && read -r _ _ _ available _; } < <(df -Pk -- "$TARGET" 2>/dev/null) || true
  [[ $available =~ ^[0-9]+$ ]] || return 0
  available=$(( available * 1024 ))
  if (( available < needed )); then
    die "not enough space in $TARGET: the set needs $(format_mb "$TOTAL_RAW_BYTES") unpacked and $(format_mb "$in_flight") for the shards downloading at once, $(format_mb "$available") is free; raise the volume's sizeLimit (or lower GPUBUILD_PARALLEL)"
  fi
}

# --- downloading ----------------------------------------------------------------------------

shard_url() {
  printf '%s/blobs/%s.tar.zst' "$STORE_URL" "$1"
}

# curl reads the URL from a config on a pipe, so the SAS is not in its argv (ps) either.
curl_config() {
  local url
  url=$(shard_url "$1")
  if [[ -n $SAS ]]; then
    url="$url?$SAS"
  fi
  url=${url//\\/\\\\}
  printf 'url = "%s"\n' "${url//\"/\\\"}"
}

file_size() {
  stat -c %s -- "$1" 2>/dev/null || echo 0
}

# Why curl could not get a shard, as "<class> <message>" (see fetch_shard_once).
download_failure() {
  local sha=$1 rc=$2 err=$3 message code=""
  message=$(redact "$(sed -n '$p' "$err")")
  message=${message#curl: }
  if [[ $message =~ returned\ error:\ ([0-9]{3}) ]]; then
    code=${BASH_REMATCH[1]}
  fi
  if [[ ${STORE_URL,,} == file://* ]]; then
    local path
    path=$(shard_url "$sha")
    path=${path#file://}
    if [[ ! -e $path ]]; then
      echo "fatal the store has no blobs/$sha.tar.zst (missing at $path); publish the profile again (gpubuild publish-cache)"
    elif [[ ! -r $path ]]; then
      echo "fatal $path exists but this user ($EUID) may not read it (unreadable: its mode is $(stat -c %a -- "$path" 2>/dev/null)); make the store's blobs world-readable (chmod a+r)"
    else
      echo "transport $message (curl exit $rc)"
    fi
    return
  fi
  case $rc:$code in
    22:401 | 22:403)
      if [[ -n $SAS ]]; then
        echo "fatal the store refused access (HTTP $code, forbidden): the SAS from $SAS_SOURCE is missing, expired or lacks read permission; make a new one (gpubuild sas)"
      else
        echo "fatal the store refused access (HTTP $code, forbidden) and no SAS was given: an Azure container needs one (GPUBUILD_SAS or GPUBUILD_SAS_FILE); a web server must be allowed to read the store's blobs/ folder"
      fi
      ;;
    22:404)
      echo "fatal the store has no blobs/$sha.tar.zst (HTTP 404, missing); publish the profile again (gpubuild publish-cache)"
      ;;
    22:*)
      echo "transport HTTP $code from the store ($message)"
      ;;
    23:*)
      echo "fatal cannot write the download to $DOWNLOADS (is the volume full?): $message"
      ;;
    *)
      echo "transport $message (curl exit $rc)"
      ;;
  esac
}

# Downloads shard $1 into $2, resuming a part that an earlier attempt left; the response's
# headers go to $5 (for Retry-After).
download_shard() {
  local sha=$1 part=$2 bytes=$3 err=$4 headers=$5 have rc=0
  have=$(file_size "$part")
  if (( have > bytes )); then
    rm -f -- "$part"
    have=0
  fi
  (( have == bytes )) && return 0
  local -a resume=()
  (( have > 0 )) && resume=(--continue-at -)
  # curl's own --retry is not used: fetch_shard retries, with a message per attempt.
  curl --fail --silent --show-error --connect-timeout 15 \
    --speed-limit 1024 --speed-time "$STALL_SECONDS" "${resume[@]}" \
    --dump-header "$headers" --config <(curl_config "$sha") --output "$part" 2>"$err" || rc=$?
  if (( rc == 33 )); then
    # The server ignores Range requests: start this shard from its first byte.
    log "shard ${sha:0:12}: the store cannot resume a download; starting it again from 0"
    rm -f -- "$part"
    rc=0
    curl --fail --silent --show-error --connect-timeout 15 \
      --speed-limit 1024 --speed-time "$STALL_SECONDS" \
      --dump-header "$headers" --config <(curl_config "$sha") --output "$part" 2>"$err" || rc=$?
  fi
  return "$rc"
}

# Unpack slots: UNPACKERS tokens in a FIFO that every worker inherits open. A worker takes one
# (a blocking read of one byte, no polling) before it hashes and unpacks, and gives it back
# after, whatever happened. No timeout: bash 5.2's `read -t` on a FIFO shared by several
# readers can outlive its deadline in read(2), or take a byte and still report the timeout,
# which would lose the token. A token is only lost with the worker holding it, and a worker
# that ends without a result stops the whole run (fetch_all).
open_unpack_slots() {
  local count
  mkfifo -m 600 -- "$WORK/unpack-slots" "$WORK/tick" ||
    die "cannot create FIFOs in $WORK (a file system without them?); point TMPDIR at a local folder"
  exec {SLOTS_FD}<>"$WORK/unpack-slots" {TICK_FD}<>"$WORK/tick"
  for (( count = 0; count < UNPACKERS; count++ )); do
    printf x >&"$SLOTS_FD"
  done
}

# Sets SLOT_HELD to yes once a token is read (the status of read is not what says so).
take_unpack_slot() {
  local token=""
  SLOT_HELD=no
  read -r -n 1 -u "$SLOTS_FD" token || true
  if [[ $token == x ]]; then
    SLOT_HELD=yes
  fi
}

give_unpack_slot() {
  if [[ $SLOT_HELD == yes ]]; then
    printf x >&"$SLOTS_FD"
    SLOT_HELD=no
  fi
}

# One attempt at one shard: download (or resume), verify, and only then unpack. On failure
# prints "<class> <message>", the class being one of
#   transport  the store could not be reached or cut the stream (worth another attempt)
#   corrupt    the bytes are not the pinned ones (another attempt, then an integrity failure)
#   fatal      no point in trying again (HTTP 403/404, a full volume, a bad archive)
fetch_shard_once() {
  local sha=$1 bytes=$2 files=$3 blake3=$4 dir="$WORK/$1" part="$DOWNLOADS/$1.part" rc=0
  if ! { rm -rf -- "$dir" && mkdir -p -- "$dir"; }; then
    echo "fatal cannot create work files in $WORK"
    return 1
  fi
  download_shard "$sha" "$part" "$bytes" "$dir/curl.err" "$dir/headers" || rc=$?
  if (( rc != 0 )); then
    download_failure "$sha" "$rc" "$dir/curl.err"
    return 1
  fi
  take_unpack_slot
  unpack_verified "$sha" "$bytes" "$files" "$dir" "$part" "$blake3" || rc=$?
  give_unpack_slot
  return "$rc"
}

# Hashes the downloaded shard $5 and, only when it is the pinned one ($1 its sha256, $6 its
# BLAKE3 or "-"), unpacks it into staging and checks its member count (see fetch_shard_once).
unpack_verified() {
  local sha=$1 bytes=$2 files=$3 dir=$4 part=$5 blake3=$6
  local got="" size pinned=$1 algorithm=sha256
  size=$(file_size "$part")
  if [[ $HAS_B3SUM == yes && $blake3 != - ]]; then
    # b3sum maps the file (no copy through a read buffer); one thread: an unpack slot is a core.
    read -r got _ < <(b3sum --num-threads 1 --no-names "$part" 2>/dev/null) || true
    if [[ $got =~ ^[0-9a-f]{64}$ ]]; then
      pinned=$blake3 algorithm=BLAKE3
    else
      # A b3sum that hashes a pipe but not this file (a sandbox refusing its memory map, say)
      # must not read as tampering: the pinned sha256 proves the bytes as well.
      log "shard ${sha:0:12}: b3sum could not hash the download; checking its sha256 instead"
      got=""
    fi
  fi
  if [[ $algorithm == sha256 ]]; then
    read -r got _ < <("${HASHER[@]}" <"$part") || true
  fi
  if [[ -z $got || $got != "$pinned" || $size != "$bytes" ]]; then
    # Never unpacked, and never resumed: the next attempt downloads it whole.
    rm -f -- "$part"
    echo "corrupt $algorithm mismatch: got ${got:-nothing} ($size bytes), pinned $pinned ($bytes bytes)"
    return 1
  fi
  local -a codes
  : >"$dir/zstd.err"
  if [[ $EXTRACTOR == bsdtar ]]; then
    # bsdtar lists members on stderr ("x NAME"), beside its errors ("bsdtar: ...").
    codes=(0 0)
    bsdtar -x -v -f "$part" -C "$STAGING" "${BSDTAR_SAFE[@]}" 2>"$dir/tar.err" || codes=(0 "$?")
    grep '^x ' "$dir/tar.err" >"$dir/members" || true
  else
    zstd -d -q "${ZSTD_NO_CHECK[@]}" -c -- "$part" 2>"$dir/zstd.err" |
      tar -x -v -f - -C "$STAGING" --no-same-owner "${TAR_SAFE_LINKS[@]}" 2>"$dir/tar.err" >"$dir/members"
    codes=("${PIPESTATUS[@]}")
  fi
  rm -f -- "$part"
  if (( codes[1] != 0 )) && grep -q 'No space left on device' "$dir/tar.err"; then
    echo "fatal the volume at $TARGET is full (No space left on device); raise the emptyDir sizeLimit or the node's ephemeral storage"
    return 1
  fi
  if (( codes[0] != 0 || codes[1] != 0 )); then
    echo "fatal the shard has the pinned digest but does not unpack: $(grep -v '^x ' "$dir/zstd.err" "$dir/tar.err" | head -n 2 | cut -d: -f2- | tr '\n' ' ')"
    return 1
  fi
  local members
  members=$(grep -cv '/$' "$dir/members" || true)
  if (( members != files )); then
    echo "fatal it unpacked $members files where the manifest says $files"
    return 1
  fi
  return 0
}

# The seconds a Retry-After header in the headers file $1 asks for (0 without one), at most
# RETRY_AFTER_MAX; either form: seconds, or an HTTP date.
retry_after_seconds() {
  local value="" seconds=0
  if [[ -f $1 ]]; then
    value=$(grep -i '^retry-after:' "$1" | tail -n 1 | cut -d: -f2- | tr -d '\r') || value=""
  fi
  value=${value#"${value%%[![:space:]]*}"}
  value=${value%"${value##*[![:space:]]}"}
  if [[ $value =~ ^[0-9]{1,6}$ ]]; then
    seconds=$(( 10#$value ))
  elif [[ -n $value ]] && [[ $value =~ ^[A-Za-z0-9\ ,:-]{1,40}$ ]] && seconds=$(date -u -d "$value" +%s 2>/dev/null); then
    seconds=$(( seconds - $(date -u +%s) ))
  else
    seconds=0
  fi
  (( seconds > 0 )) || seconds=0
  (( seconds <= RETRY_AFTER_MAX )) || seconds=$RETRY_AFTER_MAX
  printf '%d' "$seconds"
}

# A random number from 0 to $1: bash's 32-bit SRANDOM where it has one (5.1+), else RANDOM.
random_upto() {
  local value=${SRANDOM:-$(( (RANDOM << 15) | RANDOM ))}
  printf '%d' $(( value % ($1 + 1) ))
}

# Milliseconds to wait after failed attempt $1 when the store asked for $2 seconds: full jitter
# over an exponential window, so that pods throttled together spread out instead of coming
# back in one wave.
retry_delay_ms() {
  local attempt=$1 after=$2 window=$BACKOFF_CAP_MS
  if (( attempt <= 15 )); then
    window=$(( BACKOFF_BASE_MS << (attempt - 1) ))
    (( window <= BACKOFF_CAP_MS )) || window=$BACKOFF_CAP_MS
  fi
  printf '%d' $(( after * 1000 + $(random_upto "$window") ))
}

# Every attempt at shard number $1; writes "$WORK/$1.result": "ok <ms>" or "<class> <message>",
# and "$WORK/$1.retries": how many attempts failed before the last.
fetch_shard() {
  local index=$1 sha=${SHAS[$1]} bytes=${BYTES[$1]} files=${FILES[$1]} blake3=${BLAKE3S[$1]}
  local attempt=1 started outcome class message after delay result
  while :; do
    started=$(now_ms)
    if outcome=$(fetch_shard_once "$sha" "$bytes" "$files" "$blake3"); then
      result="ok $(( $(now_ms) - started ))"
      break
    fi
    class=${outcome%% *}
    message=${outcome#* }
    if [[ $class == fatal ]]; then
      result="fatal $message"
      break
    fi
    if (( attempt >= RETRIES )); then
      if [[ $class == corrupt ]]; then
        result="integrity $message"
      else
        result="unreachable $message"
      fi
      break
    fi
    after=$(retry_after_seconds "$WORK/$sha/headers")
    delay=$(retry_delay_ms "$attempt" "$after")
    local waited=""
    (( after == 0 )) || waited=" (the store asked for ${after} s: Retry-After)"
    log "shard ${sha:0:12}: attempt $attempt of $RETRIES failed: $message; trying again in $(( delay / 1000 )).$(printf '%03d' $(( delay % 1000 ))) s$waited"
    sleep "$(( delay / 1000 )).$(printf '%03d' $(( delay % 1000 )))"
    attempt=$(( attempt + 1 ))
  done
  printf '%d\n' $(( attempt - 1 )) >"$WORK/$index.retries"
  printf '%s\n' "$result" >"$WORK/$index.result.tmp"
  mv -f -- "$WORK/$index.result.tmp" "$WORK/$index.result"
}

# Starts fetch_shard in a process group of its own, so that a failure can stop the others
# mid-download (job control is on only while starting it: left on, bash prints job notices).
start_worker() {
  set -m
  fetch_shard "$1" &
  set +m
  WORKERS[$!]=$1
}

stop_workers() {
  local pid
  for pid in "${!WORKERS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${!WORKERS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  WORKERS=()
}

load_shards() {
  SHAS=() BYTES=() FILES=() BLAKE3S=() LABELS=()
  local sha bytes files blake3 label
  while read -r sha bytes files blake3 label; do
    [[ -n $sha ]] || continue
    if [[ ! $sha =~ ^[0-9a-f]{64}$ || ! $bytes =~ ^[0-9]{1,15}$ || ! $files =~ ^[0-9]{1,9}$ ||
      ! $blake3 =~ ^([0-9a-f]{64}|-)$ ]]; then
      die "this script's shard table is damaged (line for ${sha:0:12}); generate it again (gpubuild init-script)"
    fi
    SHAS+=("$sha") BYTES+=("$bytes") FILES+=("$files") BLAKE3S+=("$blake3") LABELS+=("$label")
  done < <(shard_table)
}

make_skeleton() {
  mkdir -p -- "$STAGING" "$DOWNLOADS" || die "cannot create $STAGING"
  local -a folders=()
  local folder
  while IFS= read -r folder; do
    [[ -n $folder ]] && folders+=("$STAGING/$folder")
    if (( ${#folders[@]} >= 500 )); then
      mkdir -p -- "${folders[@]}" || die "cannot create the folders of the set in $STAGING (is the volume full?)"
      folders=()
    fi
  done < <(directory_skeleton)
  if (( ${#folders[@]} )); then
    mkdir -p -- "${folders[@]}" || die "cannot create the folders of the set in $STAGING (is the volume full?)"
  fi
}

# "1 file", "2,183 files".
count_of() {
  local number=$1 word=$2 text
  text=$(printf "%'d" "$number" 2>/dev/null) || text=$number
  if (( number == 1 )); then
    printf '%s %s' "$text" "$word"
  else
    printf '%s %ss' "$text" "$word"
  fi
}

# Downloads every shard, PARALLEL at once, biggest first. On failure sets FAILURE_CLASS
# (fatal, unreachable or integrity) and FAILURE, stops the other downloads, returns 1.
fetch_all() {
  FAILURE_CLASS=""
  FAILURE=""
  local count=${#SHAS[@]} next=0 finished=0 finished_bytes=0 started last_beat retried
  read_clock
  started=$NOW_MS
  last_beat=$started
  while (( finished < count )) && [[ -z $FAILURE_CLASS ]]; do
    while (( next < count && ${#WORKERS[@]} < PARALLEL )); do
      start_worker "$next"
      next=$(( next + 1 ))
    done
    local pid index result class rest
    for pid in "${!WORKERS[@]}"; do
      index=${WORKERS[$pid]}
      if [[ ! -f $WORK/$index.result ]] && kill -0 "$pid" 2>/dev/null; then
        continue
      fi
      wait "$pid" 2>/dev/null || true
      unset "WORKERS[$pid]"
      result="fatal its download process ended without a result"
      if [[ -f $WORK/$index.result ]]; then
        read -r result <"$WORK/$index.result"
      fi
      class=${result%% *}
      rest=${result#* }
      if [[ $class != ok ]]; then
        FAILURE_CLASS=$class
        FAILURE="shard ${SHAS[$index]:0:12} (${LABELS[$index]}) at $(shard_url "${SHAS[$index]}"): $rest"
        stop_workers
        break
      fi
      retried=0
      if [[ -f $WORK/$index.retries ]]; then
        read -r retried <"$WORK/$index.retries" || retried=0
      fi
      [[ $retried =~ ^[0-9]{1,6}$ ]] || retried=0
      RETRIED=$(( RETRIED + retried ))
      finished=$(( finished + 1 ))
      finished_bytes=$(( finished_bytes + BYTES[index] ))
      log "shard $finished/$count done: ${LABELS[$index]} $(format_mb "${BYTES[$index]}"), $(count_of "${FILES[$index]}" file) in $(format_seconds "$rest") ($(format_rate "${BYTES[$index]}" "$rest"))"
    done
    if (( ${#WORKERS[@]} )) && [[ -z $FAILURE_CLASS ]]; then
      # A tenth of a second, waited by bash itself: nothing ever writes to the tick FIFO.
      read -r -t 0.1 -u "$TICK_FD" _ || true
      read_clock
      if (( NOW_MS - last_beat >= 10000 )); then
        last_beat=$NOW_MS
        log "progress: $finished/$count shards, $(format_mb "$finished_bytes") of $(format_mb "$TOTAL_BYTES") after $(format_seconds $(( NOW_MS - started )))"
      fi
    fi
  done
  [[ -z $FAILURE_CLASS ]]
}

# --- the switch -----------------------------------------------------------------------------

write_marker() {
  if ! { printf '%s\n' "$2" >"$STATE/$1.tmp" && mv -f -- "$STATE/$1.tmp" "$STATE/$1"; }; then
    die "cannot write $STATE/$1"
  fi
}

switch_live() {
  local source=$1 entry
  write_marker incomplete "$DIGEST"
  # From here the staged set stops being whole (its entries move): never reuse it.
  rm -f -- "$STATE/installed" "$STATE/verified-$DIGEST"
  move_live_to_trash
  for entry in "$STAGING"/*; do
    if ! mv -- "$entry" "$TARGET/" 2>/dev/null; then
      # A folder this user may not write cannot be moved to another parent: make it writable.
      chmod -R u+rwX -- "$entry" 2>/dev/null || true
      mv -- "$entry" "$TARGET/" || die "cannot move $entry into $TARGET"
    fi
  done
  rmdir -- "$STAGING"
  write_marker installed "$DIGEST $source"
  # Removed last: until now a run that finds the target treats its live set as nothing.
  rm -f -- "$STATE/incomplete"
  remove_tree "$STATE/trash" "$DOWNLOADS"
}

# --- the pip fallback -----------------------------------------------------------------------

# The Python program that removes the profile's excluded distributions, by their RECORD.
exclude_program() {
  cat <<'GPUBUILD_EXCLUDE'
import csv, os, re, shutil, sys
root, names = sys.argv[1], {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2:]}
for entry in sorted(os.listdir(root)):
    if not entry.endswith(".dist-info"):
        continue
    name = re.sub(r"[-_.]+", "-", entry[: -len(".dist-info")].split("-")[0]).lower()
    if name not in names:
        continue
    record = os.path.join(root, entry, "RECORD")
    paths = []
    if os.path.isfile(record):
        with open(record, newline="", encoding="utf-8") as f:
            paths = [row[0] for row in csv.reader(f) if row]
    for path in paths:
        full = os.path.normpath(os.path.join(root, path))
        if full.startswith(root + os.sep) and os.path.lexists(full) and not os.path.isdir(full):
            os.remove(full)
    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    print(f"[gpubuild-init] WARNING: removed excluded {name} ({len(paths)} files)")
GPUBUILD_EXCLUDE
}

fallback_pip() {
  local why=$1
  log "WARNING: ======================================================================"
  log "WARNING: the store is unreachable: $why"
  log "WARNING: falling back to pip: installing the lock built into this script."
  log "WARNING: slow, and the packages come from the package index, not the store."
  log "WARNING: ======================================================================"
  local python=${GPUBUILD_PYTHON:-}
  if [[ -z $python ]]; then
    python=$(command -v python3 || command -v python || true)
  fi
  if [[ -z $python ]] || ! "$python" -m pip --version >/dev/null 2>&1; then
    die "the pip fallback needs a python with pip (set GPUBUILD_PYTHON, or run the init container on the worker image); the store failed with: $why"
  fi
  remove_tree "$STAGING"
  mkdir -p -- "$STAGING"
  fallback_lock >"$WORK/lock.txt"
  local -a index_args=()
  local url
  while IFS= read -r url; do
    [[ -n $url ]] && index_args+=(--extra-index-url "$url")
  done < <(fallback_indexes)
  local started
  started=$(now_ms)
  if ! "$python" -m pip install --no-deps --require-hashes --no-compile \
    --disable-pip-version-check --target "$STAGING" "${index_args[@]}" -r "$WORK/lock.txt" >&2; then
    die "the pip fallback failed too (see pip's output above); nothing was changed in $TARGET"
  fi
  local -a excluded=()
  mapfile -t excluded < <(fallback_excludes)
  if (( ${#excluded[@]} )); then
    "$python" - "$STAGING" "${excluded[@]}" >&2 < <(exclude_program) ||
      die "applying the profile's excludes after pip failed; nothing was changed in $TARGET"
  fi
  log "WARNING: installed by pip in $(format_seconds $(( $(now_ms) - started ))), not from the verified store"
}

# --- main -----------------------------------------------------------------------------------

declare -A WORKERS=()
declare -a SHAS=() BYTES=() FILES=() BLAKE3S=() LABELS=()
WORK=""
RETRIED=0
NOW_MS=0
SLOTS_FD=""
TICK_FD=""
SLOT_HELD=no
HAS_B3SUM=no

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  if (( ${#WORKERS[@]} )); then
    stop_workers
  fi
  # A failed run leaves the target as it found it: the staged part goes. Partial downloads
  # stay only when the store could not be reached, for the next run to resume.
  if (( code != 0 )) && [[ -n ${STAGING:-} && -d $STAGING && ! -e $STATE/verified-$DIGEST ]]; then
    remove_tree "$STAGING"
  fi
  if (( code != 0 )) && [[ -n ${DOWNLOADS:-} && -d $DOWNLOADS ]]; then
    if [[ ${FAILURE_CLASS:-} == unreachable ]]; then
      rmdir -- "$DOWNLOADS" 2>/dev/null || true
    else
      remove_tree "$DOWNLOADS"
    fi
  fi
  if [[ -n $WORK ]]; then
    rm -rf -- "$WORK"
  fi
  exit "$code"
}

make_work_dir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpubuild-init.XXXXXX" 2>/dev/null) && return 0
  WORK="$STATE/work"
  mkdir -p -- "$WORK" || die "cannot create a work folder in ${TMPDIR:-/tmp} or $STATE"
}

main() {
  local started
  started=$(now_ms)
  trap cleanup EXIT
  trap 'log "stopped by a signal"; exit 143' INT TERM
  read_settings
  check_tools
  report_sas_expiry
  take_lock
  recover
  local pip_installed=no
  if [[ $(installed_digest) == "$DIGEST" ]]; then
    if [[ $(installed_source) != pip ]]; then
      log "$PROFILE $DIGEST is already installed in $TARGET; nothing to do"
      return 0
    fi
    # A pip fallback is not the verified set: replace it as soon as the store answers.
    log "$PROFILE $DIGEST was installed by the pip fallback; trying the verified store again"
    pip_installed=yes
  fi
  make_work_dir
  local fetch_started source=store
  fetch_started=$(now_ms)
  if [[ -e $STATE/verified-$DIGEST && -d $STAGING ]]; then
    log "an earlier run left a complete, verified copy of $DIGEST; switching to it"
    source=$(<"$STATE/verified-$DIGEST")
  else
    load_shards
    check_space
    log "installing $PROFILE $DIGEST into $TARGET: $(count_of "${#SHAS[@]}" shard), $(format_mb "$TOTAL_BYTES") to download, $(format_mb "$TOTAL_RAW_BYTES") and $(count_of "$TOTAL_FILES" file) unpacked"
    log "store $(redact "$STORE_URL") (SAS: $SAS_SOURCE); $PARALLEL downloads at once ($RETRIES attempts each), $UNPACKERS unpacking at once ($(count_of "$CORES" core) usable, by $CORES_FROM); unpacking with $( [[ $EXTRACTOR == bsdtar ]] && echo bsdtar || echo 'zstd | GNU tar'), checking $(checksum_tool)"
    make_skeleton
    open_unpack_slots
    if ! fetch_all; then
      if [[ $FAILURE_CLASS == unreachable && $pip_installed == yes ]]; then
        log "WARNING: $FAILURE; keeping the set the pip fallback installed earlier"
        return 0
      fi
      case $FAILURE_CLASS:$FALLBACK in
        unreachable:pip)
          fallback_pip "$FAILURE"
          source=pip
          ;;
        integrity:*)
          die "$FAILURE. The store holds other bytes than this script pins: do not trust it: delete the damaged blobs/<sha256>.tar.zst named above from the store, then publish the profile again (gpubuild publish-cache --repair); nothing was changed in $TARGET"
          ;;
        unreachable:*)
          die "$FAILURE. No luck after $RETRIES attempts: check GPUBUILD_STORE_URL and the pod's network; nothing was changed in $TARGET"
          ;;
        *)
          die "$FAILURE; nothing was changed in $TARGET"
          ;;
      esac
    fi
    write_marker "verified-$DIGEST" "$source"
  fi
  local fetched=$(( $(now_ms) - fetch_started ))
  local retried_text="$RETRIED retries"
  (( RETRIED != 1 )) || retried_text="1 retry"
  switch_live "$source"
  log "done: $PROFILE $DIGEST installed in $TARGET from the $source: $(format_mb "$TOTAL_BYTES") in $(count_of "$SHARD_COUNT" shard), $(count_of "$TOTAL_FILES" file); $(format_seconds $(( $(now_ms) - started ))) in all ($(format_rate "$TOTAL_BYTES" "$fetched") download and unpack; $retried_text)"
}

main "$@"
