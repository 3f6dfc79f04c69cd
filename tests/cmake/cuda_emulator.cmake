# The CUDA backend on an emulated device (tests/cuda_emulator/emulator.h), label unit: the same
# test source as the GPU test tests/gpu/cuda_backend_test.cc, so the backend's host side (step
# layout, staging, stream order, KV data movement) is checked against the CPU backend on every
# machine that has the CUDA headers, GPU or not.
#
# Linking: the emulator's objects define the CUDA runtime, cuBLAS and kernel-launcher symbols
# that dmsrt_runtime's CUDA backend calls. Object files come first on the link line, so the
# linker takes those definitions and extracts nothing for them from dmsrt_kernels_cuda (a
# forgotten launcher shows up as a duplicate-symbol error, not as a silent mix) and binds no
# call of the backend to libcudart or libcublas.
if(DMSRT_HAVE_CUDA)
  file(GLOB CUDA_EMULATOR_SRC CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/cuda_emulator/*.cc)
  add_library(dmsrt_cuda_emulator OBJECT ${CUDA_EMULATOR_SRC})
  target_include_directories(dmsrt_cuda_emulator PUBLIC ${PROJECT_SOURCE_DIR})
  target_include_directories(dmsrt_cuda_emulator SYSTEM PUBLIC ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(dmsrt_cuda_emulator PUBLIC dmsrt_kernels)

  add_executable(cuda_backend_emulated_test ${CMAKE_CURRENT_SOURCE_DIR}/gpu/cuda_backend_test.cc)
  target_link_libraries(cuda_backend_emulated_test PRIVATE dmsrt_cuda_emulator dmsrt_runtime
                        GTest::gtest GTest::gtest_main)
  set_target_properties(cuda_backend_emulated_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${PROJECT_BINARY_DIR}/tests)
  add_test(NAME cuda_backend_emulated_test COMMAND cuda_backend_emulated_test)
  set_tests_properties(cuda_backend_emulated_test PROPERTIES LABELS unit TIMEOUT 900)
endif()
