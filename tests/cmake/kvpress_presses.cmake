# kvpress's presses beside dmsrt's policies, protocol b (and the passkey probe in the 4K run) (tests/bench/kvpress_presses.py, label
# bench_full: left out of CI, run with ctest -L bench_full). StreamingLLM, TOVA, SnapKV,
# ExpectedAttention and Knorm compress the first C = 512 of 1024 held-out tokens once at cache CR
# 2, 4 and 8 (transformers, float32, on the same GGUF and dmsrt's own token ids); `dmsrt eval`
# runs window, tova, h2o and forced at the same C and CRs (and dms, the default model's learned
# decisions at their own CR, where adapters/ has its adapter); both reports are merged into
# kvpress_presses_merged.json and .svg (docs/quality.md). A few minutes on 2 cores. Skips (exit
# 77, with the reason) where torch, transformers or kvpress or the model is missing.
if(DMSRT_PYTHON AND TARGET dmsrt)
  set(dmsrt_kvpress_extra)
  if(EXISTS ${PROJECT_SOURCE_DIR}/adapters/SmolLM2-135M-Instruct.dms.safetensors)
    set(dmsrt_kvpress_extra --dms-adapter ${PROJECT_SOURCE_DIR}/adapters/SmolLM2-135M-Instruct.dms.safetensors)
  endif()
  add_test(NAME kvpress_presses
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/kvpress_presses.py
                   --bin $<TARGET_FILE:dmsrt> --max-tokens 1024 ${dmsrt_kvpress_extra}
                   --json-out ${PROJECT_BINARY_DIR}/kvpress_presses.json
                   --run-dmsrt ${PROJECT_BINARY_DIR}/kvpress_presses_dmsrt.json
                   --merged-json ${PROJECT_BINARY_DIR}/kvpress_presses_merged.json
                   --svg ${PROJECT_BINARY_DIR}/kvpress_presses_merged.svg)
  set_tests_properties(kvpress_presses PROPERTIES LABELS bench_full TIMEOUT 1800 RUN_SERIAL TRUE
                       SKIP_RETURN_CODE 77 ENVIRONMENT "HF_HUB_OFFLINE=1")

  # The table of docs/quality.md: 4096 held-out tokens, budgets of L / CR (dmsrt's own grid, with
  # threshold-knorm rows and forced at delay window 64), C = 3584, and the passkey probe at 1K,
  # 2K and 4K over depths 0.1, 0.5 and 0.9 under every policy and press. About an hour on 2 cores.
  add_test(NAME kvpress_presses_4k
           COMMAND ${DMSRT_PYTHON} ${PROJECT_SOURCE_DIR}/tests/bench/kvpress_presses.py
                   --bin $<TARGET_FILE:dmsrt> --max-tokens 4096 --budget-at length
                   --forced-window 64 ${dmsrt_kvpress_extra}
                   --passkey-lengths 1024,2048,4096 --passkey-depths 0.1,0.5,0.9
                   --json-out ${PROJECT_BINARY_DIR}/kvpress_presses_4k.json
                   --run-dmsrt ${PROJECT_BINARY_DIR}/kvpress_presses_4k_dmsrt.json
                   --merged-json ${PROJECT_BINARY_DIR}/kvpress_presses_4k_merged.json
                   --svg ${PROJECT_BINARY_DIR}/kvpress_presses_4k_merged.svg)
  set_tests_properties(kvpress_presses_4k PROPERTIES LABELS bench_full TIMEOUT 7200 RUN_SERIAL TRUE
                       SKIP_RETURN_CODE 77 ENVIRONMENT "HF_HUB_OFFLINE=1")
endif()
